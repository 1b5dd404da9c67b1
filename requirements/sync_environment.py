"""Copy the exact set of requirements/lock.txt into environment.yml's pip list (run by `make lock`; stdlib only).

conda runs one `pip install -r` over the pip list, so the list cannot use the hashed lock itself (hash-checking mode
would refuse the unhashed torch pin and the editable install): it repeats the lock's pins, without hashes, between
the `# lock:begin` and `# lock:end` lines. tests/test_packaging.py checks that the two agree.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def locked_pins(lock: Path) -> list[str]:
    return [f"{m[1]}=={m[2]}" for line in lock.read_text().splitlines() if (m := PIN.match(line))]


def main() -> int:
    env = ROOT / "environment.yml"
    lines = env.read_text().splitlines(keepends=True)
    begin = next(i for i, line in enumerate(lines) if line.strip() == "# lock:begin")
    end = next(i for i, line in enumerate(lines) if line.strip() == "# lock:end")
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    pins = [f"{indent}- {pin}\n" for pin in locked_pins(ROOT / "requirements" / "lock.txt")]
    env.write_text("".join(lines[: begin + 1] + pins + lines[end:]))
    print(f"environment.yml: {len(pins)} pins from requirements/lock.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
