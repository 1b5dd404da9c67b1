"""Two import-linter contract types for the rules its built-in ones cannot state (used by ``lint-imports`` and
``tests/test_architecture.py``; configured in ``pyproject.toml`` under ``[tool.importlinter]``):

* ``private_names``: no ``_private`` name is imported from a module of another subpackage (``workbench.core``,
  ``workbench.methods``, ...): what crosses a subpackage boundary is public.
* ``inner_imports``: an import inside a function or method is allowed only for an optional third-party library
  (one of ``allowed``): the package's own modules and its required dependencies are imported at module top, where
  the layer contracts see them.

Both read the modules' source with ``ast``; grimp's graph gives the module list.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from importlinter import Contract, ContractCheck, fields, output


def _source(module: str) -> tuple[Path, ast.Module] | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    path = Path(spec.origin)
    return path, ast.parse(path.read_text(), filename=str(path))


def _subpackage(module: str, root: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and parts[0] == root) else module


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    if not node.level:
        return node.module
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class PrivateNamesContract(Contract):
    type_name = "private_names"
    root = fields.StringField(default="workbench")

    def check(self, graph, verbose: bool) -> ContractCheck:
        root = self.root
        problems = []
        for module in sorted(graph.modules):
            if not module.startswith(root + "."):
                continue
            found = _source(module)
            if found is None:
                continue
            path, tree = found
            is_package = path.name == "__init__.py"
            for node in ast.walk(tree):
                if not isinstance(node, ast.ImportFrom):
                    continue
                target = _absolute(node, module, is_package)
                if not target or not (target == root or target.startswith(root + ".")):
                    continue
                if _subpackage(target, root) == _subpackage(module, root):
                    continue
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private or target.rsplit(".", 1)[-1].startswith("_"):
                    problems.append(f"{module}:{node.lineno} imports {private or target} from {target}")
        return ContractCheck(kept=not problems, metadata={"problems": problems})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["problems"]:
            output.print_error(line, bold=False)
            output.new_line()


class InnerImportsContract(Contract):
    type_name = "inner_imports"
    root = fields.StringField(default="workbench")
    allowed = fields.SetField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        allowed = set(self.allowed)
        problems = []
        for module in sorted(graph.modules):
            if not (module == self.root or module.startswith(self.root + ".")):
                continue
            found = _source(module)
            if found is None:
                continue
            _, tree = found
            for func in ast.walk(tree):
                if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    continue
                for node in ast.walk(func):
                    if isinstance(node, ast.Import):
                        names = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom):
                        names = [node.module or "."] if not node.level else ["."]
                    else:
                        continue
                    bad = [n for n in names if n.split(".")[0] not in allowed]
                    if bad:
                        problems.append(f"{module}:{node.lineno} imports {', '.join(bad)} inside "
                                        f"{getattr(func, 'name', 'a lambda')}()")
        return ContractCheck(kept=not problems, metadata={"problems": sorted(set(problems))})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["problems"]:
            output.print_error(line, bold=False)
            output.new_line()
