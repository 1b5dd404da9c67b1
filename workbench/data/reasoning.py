"""Multi-step reasoning tasks with a gold intermediate result at every step (research thread 3, methods.md).

Each generator returns a :class:`ReasoningSet`: prompts, final answers, and per item the list of gold intermediate
results (one per reasoning step), so that every latent step of :mod:`workbench.methods.latent` can be scored against
what the model *should* hold at that point. All generators are seeded and deterministic.

- ``arithmetic``: variable chains ``a=3; b=a+4; c=b*2; c=?``; every intermediate value is a single digit 0-9
  (operations are drawn among those that keep the value in range), so each gold is one digit token for the
  registry's tokenizers. ``n_hops`` is the number of operations after the first assignment; the gold steps are
  the ``n_hops`` computed values (the last one is the answer).
- ``graph``: ProsQA-style reachability in a random DAG of nonce concepts ("Every wumpus is a zorpus."); the question
  asks which of two concepts a named individual is; the gold intermediates are the concepts on the path.

The answer parse rules are documented on :meth:`ReasoningSet.parse`: the first digit run (arithmetic), the first
of the two candidate concepts mentioned (graph).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

REASONING_TASKS = ("arithmetic", "graph")
MAX_HOPS = 8  # beyond this the chains stop being readable prompts for a 135M model; latent loops allow more steps
_VARS = "abcdefghijklmnopqrstuvwxyz"
# Nonce concept names in the style of ProsQA (which uses "wumpus", "yumpus", ...). Short, so that a tokenizer's
# first token of " name" is distinctive; the gold intermediate token is that first token.
CONCEPTS = (
    "wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus", "tumpus", "vumpus", "impus", "jompus",
    "gorpus", "shumpus", "lempus", "sterpus", "grimpus", "lorpus", "brimpus", "fompus", "zhorpus", "kempus",
)
NAMES = ("Alex", "Max", "Sam", "Tom", "Jack", "Anna", "Lily", "Rex", "Fae", "Wren")


@dataclass
class ReasoningSet:
    task: str
    prompts: list[str]
    answers: list[str]  # the final answer as text ("7", "zorpus")
    steps: list[list[str]]  # gold intermediate results per item, one per reasoning step (text)
    candidates: list[list[str]] = field(default_factory=list)  # graph: the two options; arithmetic: empty
    params: dict = field(default_factory=dict)
    answer_cue: str = " Answer:"  # appended after the thinking phase; the answer is decoded after it
    cot_cue: str = " Let's think step by step."

    def __len__(self) -> int:
        return len(self.prompts)

    def parse(self, i: int, text: str) -> str | None:
        """The answer in generated ``text`` for item ``i``: first digit run (arithmetic) or the first candidate
        concept named (graph, whole word, case-insensitive); None if there is none."""
        if self.task == "arithmetic":
            m = re.search(r"[0-9]+", text)
            return m.group() if m else None
        hits = [(m.start(), c) for c in self.candidates[i]
                for m in [re.search(rf"\b{re.escape(c)}\b", text, flags=re.IGNORECASE)] if m]
        return min(hits)[1] if hits else None

    def correct(self, i: int, text: str) -> bool:
        return self.parse(i, text) == self.answers[i]

    def step_texts(self, i: int) -> list[str]:
        """Item ``i``'s reasoning written out, one string per step (what a chain-of-thought model is taught to write):
        arithmetic ``[" b=7.", " c=9."]`` (each step names its variable and value: four tokens for the registry's
        tokenizers), graph ``[" Max is a yumpus.", ...]`` (the individual and the concept reached)."""
        if self.task == "arithmetic":
            return [f" {_VARS[h + 1]}={v}." for h, v in enumerate(self.steps[i])]
        who = self.prompts[i].split(" is a ", 1)[0]
        return [f" {who} is a {c}." for c in self.steps[i]]

    def subset(self, idx: Sequence[int]) -> ReasoningSet:
        idx = list(idx)
        return ReasoningSet(self.task, [self.prompts[i] for i in idx], [self.answers[i] for i in idx],
                            [self.steps[i] for i in idx], [self.candidates[i] for i in idx] if self.candidates else [],
                            dict(self.params), self.answer_cue, self.cot_cue)


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in {lo}..{hi}, got {value!r}")
    return value


def arithmetic_chains(n: int, *, n_hops: int = 3, seed: int = 0) -> ReasoningSet:
    """``a=3; b=a+4; c=b*2; c=?``: ``n_hops`` operations, every value (start and intermediates) in 0..9."""
    _check_int("n", n, 1, 1_000_000)
    _check_int("n_hops", n_hops, 1, MAX_HOPS)
    rng = random.Random(seed)
    prompts, answers, steps = [], [], []
    for _ in range(n):
        value = rng.randint(1, 9)
        parts, golds = [f"a={value}"], [str(value)]
        for h in range(n_hops):
            ops = [("+", k) for k in range(1, 10 - value)] + [("-", k) for k in range(1, value + 1)]
            if 2 * value <= 9 and value > 0:
                ops.append(("*", 2))
            op, k = rng.choice(ops)
            value = value + k if op == "+" else value - k if op == "-" else value * k
            parts.append(f"{_VARS[h + 1]}={_VARS[h]}{op}{k}")
            golds.append(str(value))
        prompts.append("; ".join(parts) + f"; {_VARS[n_hops]}=?")
        answers.append(str(value))
        steps.append(golds[1:])  # the computed values; the start value is given in the prompt
    return ReasoningSet("arithmetic", prompts, answers, steps, [], {"n": n, "n_hops": n_hops, "seed": seed})


def graph_reachability(n: int, *, n_hops: int = 3, n_distractors: int = 3, seed: int = 0) -> ReasoningSet:
    """ProsQA-style: a chain of ``n_hops`` "Every X is a Y." facts from the individual's concept to the answer,
    a distractor chain of the same length to the wrong option, extra distractor facts, shuffled."""
    _check_int("n", n, 1, 1_000_000)
    _check_int("n_hops", n_hops, 1, MAX_HOPS)
    _check_int("n_distractors", n_distractors, 0, 10)
    if 2 * (n_hops + 1) + n_distractors > len(CONCEPTS):
        raise ValueError(f"n_hops={n_hops} with n_distractors={n_distractors} needs "
                         f"{2 * (n_hops + 1) + n_distractors} concepts; there are {len(CONCEPTS)}")
    rng = random.Random(seed)
    prompts, answers, steps, cands = [], [], [], []
    for _ in range(n):
        names = rng.sample(CONCEPTS, 2 * (n_hops + 1) + n_distractors)
        path, wrong, extra = names[: n_hops + 1], names[n_hops + 1 : 2 * (n_hops + 1)], names[2 * (n_hops + 1) :]
        who = rng.choice(NAMES)
        facts = [f"Every {a} is a {b}." for a, b in zip(path, path[1:])]
        facts += [f"Every {a} is a {b}." for a, b in zip(wrong, wrong[1:])]
        facts += [f"Every {e} is a {rng.choice(wrong[1:] or wrong)}." for e in extra]
        rng.shuffle(facts)
        options = [path[-1], wrong[-1]]
        rng.shuffle(options)
        prompts.append(f"{who} is a {path[0]}. " + " ".join(facts)
                       + f" Question: Is {who} a {options[0]} or a {options[1]}?")
        answers.append(path[-1])
        steps.append(path[1:])
        cands.append(options)
    return ReasoningSet("graph", prompts, answers, steps, cands,
                        {"n": n, "n_hops": n_hops, "n_distractors": n_distractors, "seed": seed})


def arithmetic_operands(rs: ReasoningSet) -> tuple[list[int], list[list[str]], list[list[int]]]:
    """What each arithmetic prompt writes: (start values, operators per hop ("+", "-", "*"), constants per hop).
    The computed intermediates are functions of these alone; the fact-retention control probes them."""
    if rs.task != "arithmetic":
        raise ValueError(f"operands are defined for task 'arithmetic', got {rs.task!r}")
    starts, ops, consts = [], [], []
    for prompt in rs.prompts:
        parts = prompt.split("; ")
        m = re.fullmatch(r"a=(\d)", parts[0])
        hops = [re.fullmatch(r"[a-z]=[a-z]([+*-])(\d)", p) for p in parts[1:-1]]
        if m is None or any(h is None for h in hops):
            raise ValueError(f"not an arithmetic chain of this package: {prompt!r}")
        starts.append(int(m.group(1)))
        ops.append([h.group(1) for h in hops])
        consts.append([int(h.group(2)) for h in hops])
    return starts, ops, consts


def make_reasoning_task(task: str, n: int, *, n_hops: int = 3, seed: int = 0, **options) -> ReasoningSet:
    """Dispatch by name; unknown names raise with the list of tasks."""
    if task == "arithmetic":
        if options:
            raise ValueError(f"arithmetic takes no options {sorted(options)}")
        return arithmetic_chains(n, n_hops=n_hops, seed=seed)
    if task == "graph":
        return graph_reachability(n, n_hops=n_hops, seed=seed, **options)
    raise ValueError(f"unknown reasoning task {task!r}; valid tasks: {list(REASONING_TASKS)}")


def gold_step_token_ids(tokenizer, rs: ReasoningSet) -> list[list[int]]:
    """Per item, the token id of each gold intermediate: the first token of " <result>" without the space token.

    Numbers 0-9 and the nonce concepts start with a distinctive token for every registry tokenizer; where a
    tokenizer splits the leading space off, the token after it is used.
    """
    out = []
    for golds in rs.steps:
        ids = []
        for g in golds:
            toks = tokenizer(" " + g, add_special_tokens=False)["input_ids"]
            first = toks[0]
            if tokenizer.decode([first]).strip() == "" and len(toks) > 1:
                first = toks[1]
            ids.append(int(first))
        out.append(ids)
    return out
