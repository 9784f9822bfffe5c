#!/usr/bin/env python3
"""Fails when the crate's module dependencies stop pointing one way.

Reads every `crate::…`, `super::…` and `self::…` path in src/ (test modules left out) and checks two rules:

1. Layers: a module may use modules of its own layer or of a layer below it, never above it.
   cli → app (run, scheduler, demo, check, keygen) → domain (config, plan, export, notify, operator,
   schedule, summary, sandbox) → infrastructure (auth, fhir, output, http, trust, text, progress,
   logging, task).
2. No cycles: among the children of any one module (the crate's top-level modules, the steps of
   operator::controller, the parts of export, …) the "uses" graph has no cycle. A child using its own
   parent's items is fine; two siblings using each other, directly or around a loop, is not.

`--graph` prints the top-level edges (for notes and reviews). Python 3 standard library only.
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

LAYERS = [
    ("cli", ["cli", "main"]),
    ("app", ["run", "scheduler", "demo", "check", "keygen"]),
    ("domain", ["config", "plan", "export", "notify", "operator", "schedule", "summary", "sandbox"]),
    ("infrastructure", ["auth", "fhir", "output", "storage", "http", "trust", "text", "progress", "logging", "task"]),
]
RANK = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}
LAYER_NAME = {module: name for name, modules in LAYERS for module in modules}


def module_of(path: Path, src: Path):
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts in (["lib"], ["main"]):
        return () if parts == ["lib"] else ("main",)
    return tuple(parts)


def strip_source(text: str) -> str:
    """Code without comments, string literals and `#[cfg(test)]` modules."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    out, skip_depth, depth, pending = [], None, 0, False
    for token in re.split(r"([{}])", text):
        if skip_depth is None:
            if token == "{":
                if pending:
                    skip_depth, pending = depth, False
                depth += 1
            elif token == "}":
                depth -= 1
            else:
                if re.search(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*$", token):
                    pending = True
                    token = token[: token.rfind("#[cfg(test)]")]
            if skip_depth is None:
                out.append(token)
        else:
            if token == "{":
                depth += 1
            elif token == "}":
                depth -= 1
                if depth == skip_depth:
                    skip_depth = None
    return "".join(out)


def expand_use(tree: str):
    """`a::{b, c::{d, e}}` → ['a::b', 'a::c::d', 'a::c::e']."""
    tree = re.sub(r"\s+", "", tree)
    m = re.match(r"^(.*?)\{(.*)\}$", tree)
    if not m:
        return [tree]
    prefix, inner = m.group(1), m.group(2)
    items, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(inner[start:i])
            start = i + 1
    items.append(inner[start:])
    return [p for item in items if item for p in expand_use(prefix + item)]


def references(code: str):
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", code):
        paths.extend(expand_use(m.group(1)))
    code_no_use = re.sub(r"\buse\s+[^;]+;", "", code)
    paths.extend(re.findall(r"\b((?:crate|super|self)(?:::\w+)+)", code_no_use))
    return [p for p in paths if re.match(r"^(crate|super|self)::", p)]


def resolve(path: str, here: tuple, modules: set):
    parts = path.split("::")
    if parts[0] == "crate":
        base, rest = (), parts[1:]
    else:
        base = here
        while parts and parts[0] in ("super", "self"):
            if parts[0] == "super":
                base = base[:-1]
            parts = parts[1:]
        rest = parts
    target = base
    for part in rest:
        if base + (part,) in modules or target + (part,) in modules:
            target = target + (part,)
        else:
            break
    return target


def main():
    src = Path(__file__).resolve().parent.parent / "src"
    files = {module_of(p, src): p for p in src.rglob("*.rs")}
    files = {m: p for m, p in files.items() if "tests" not in m}
    modules = set(files)
    edges = set()
    for here, path in files.items():
        code = strip_source(path.read_text())
        for ref in references(code):
            target = resolve(ref, here, modules)
            if target and target != here:
                edges.add((here, target))

    problems = []
    for a, b in sorted(edges):
        ra, rb = RANK.get(a[0] if a else ""), RANK.get(b[0])
        if a and ra is None:
            problems.append(f"src module `{a[0]}` has no layer: add it to LAYERS in scripts/check_layers.py")
        elif rb is None:
            problems.append(f"src module `{b[0]}` has no layer: add it to LAYERS in scripts/check_layers.py")
        elif ra is not None and rb < ra:
            problems.append(
                f"{'::'.join(a)} ({LAYER_NAME[a[0]]}) uses {'::'.join(b)} ({LAYER_NAME[b[0]]}): "
                "a lower layer must not use a higher one"
            )

    # Cycles among the children of each module.
    siblings = defaultdict(lambda: defaultdict(set))
    for a, b in edges:
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        if common < len(a) and common < len(b):
            parent = a[:common]
            siblings[parent][a[common]].add(b[common])
    for parent, graph in sorted(siblings.items()):
        for cycle in find_cycles(graph):
            where = "::".join(parent) or "crate"
            problems.append(f"module cycle among the children of {where}: {', '.join(cycle[:-1])} use each other (directly or around a loop)")

    if "--graph" in sys.argv:
        top = defaultdict(set)
        for a, b in edges:
            if a and b and a[0] != b[0]:
                top[a[0]].add(b[0])
        for name, modules_of_layer in LAYERS:
            print(f"[{name}]")
            for m in modules_of_layer:
                if m in top:
                    print(f"  {m} → {', '.join(sorted(top[m]))}")

    for p in sorted(set(problems)):
        print(p)
    if problems:
        sys.exit(1)
    print(f"module layers and cycles: ok ({len(files)} modules, {len(edges)} edges)")


def find_cycles(graph):
    """One representative cycle per strongly connected component with more than one node."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]
    nodes = set(graph) | {n for targets in graph.values() for n in targets}

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return result


if __name__ == "__main__":
    main()
