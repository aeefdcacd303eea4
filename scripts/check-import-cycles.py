#!/usr/bin/env python3
"""Fails when the files of a crate import each other in a cycle.

A file imports another when its code (comments and string literals stripped: a doc comment
that names a module is no import) names a path into it: a `use` tree, or a `crate::`,
`super::`, `self::` or child-module path anywhere in the code. Paths are resolved the way
rustc does for modules declared with `mod name;` (lib.rs/main.rs/mod.rs own the folder they
are in, other files the folder named after them), through inline `mod name { ... }` blocks,
and through `pub use` re-exports, so `crate::Config` re-exported from `config` is an import of
config.rs, not of lib.rs. Declaring a module (`mod name;`) is not an import of it, and neither
is a parent's use of its own submodules: a parent wires its children (lib.rs re-exports and
calls them). A child that reaches back into its parent, and siblings that reach into each
other, are imports, and a cycle of them is what this check refuses.

Usage: scripts/check-import-cycles.py [--self-test | CRATE_SRC_DIR ...]
With no argument it checks the `src/` folder of every workspace member. Prints each cycle
(the files of one strongly connected component, and one path around it) and exits 1 when
there is any. Standard library only: it runs on a fresh Debian 12 with /usr/bin/python3.
"""

import re
import sys
from pathlib import Path

ROOT_FILES = ("lib.rs", "main.rs")


def strip(src: str) -> str:
    """Source with comments and string/char literal contents blanked out."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            out.append(" ")
        elif c == "r" and re.match(r'r#*"', src[i:i + 130]) and not (i and (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'r(#*)"', src[i:])
            end = src.find('"' + m.group(1), i + len(m.group(0)))
            i = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and src[i] != '"':
                i += 2 if src[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'":
            if i + 1 < n and src[i + 1] == "\\":
                end = src.find("'", i + 2)
                i = n if end < 0 else end + 1
                out.append("' '")
            elif i + 2 < n and src[i + 2] == "'":
                i += 3
                out.append("' '")
            else:  # a lifetime
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|::|[{}();,*]|\S")


class Crate:
    def __init__(self, src: Path, root: Path):
        self.src = src
        self.modules = {}  # tuple(module path) -> file
        self.tokens = {}  # file -> token list
        self.reexports = {}  # file -> {name: (abs module path of the file's scope, path)}
        self._load(root, ())

    def _load(self, path: Path, mod: tuple):
        self.modules[mod] = path
        toks = TOKEN.findall(strip(path.read_text()))
        self.tokens[path] = toks
        own_dir = path.parent if path.name in ROOT_FILES + ("mod.rs",) else path.parent / path.stem
        # `mod name;` at the top level of the file (inline modules' children are rare; skip).
        depth = 0
        for k, t in enumerate(toks):
            if t == "{":
                depth += 1
            elif t == "}":
                depth -= 1
            elif t == "mod" and depth == 0 and k + 2 < len(toks) and toks[k + 2] == ";":
                name = toks[k + 1]
                for cand in (own_dir / f"{name}.rs", own_dir / name / "mod.rs"):
                    if cand.exists():
                        self._load(cand, mod + (name,))
                        break

    def is_ancestor(self, f: Path, g: Path) -> bool:
        """Whether the module of file `f` contains the module of file `g`."""
        fm = next(m for m, x in self.modules.items() if x == f)
        gm = next(m for m, x in self.modules.items() if x == g)
        return len(fm) < len(gm) and gm[: len(fm)] == fm

    def file_of(self, abspath: tuple, hops: int = 0):
        """The file that defines the item at `abspath` (following `pub use` re-exports)."""
        for k in range(len(abspath), -1, -1):
            prefix = abspath[:k]
            if prefix in self.modules:
                f = self.modules[prefix]
                rest = abspath[k:]
                if rest and hops < 8 and rest[0] in self.reexports.get(f, {}):
                    target = self.reexports[f][rest[0]]
                    return self.file_of(target + rest[1:], hops + 1)
                return f
        return None

    def resolve(self, cur: tuple, segs: list, children: set):
        """Absolute module path of `segs` written in module `cur`, or None (extern/local)."""
        if not segs:
            return None
        head = segs[0]
        if head == "crate":
            base, rest = (), segs[1:]
        elif head in ("super", "self"):
            base, rest = cur, segs
            while rest and rest[0] in ("super", "self"):
                if rest[0] == "super":
                    base = base[:-1]
                rest = rest[1:]
        elif head in children:
            base, rest = cur, segs
        else:
            return None
        return tuple(base) + tuple(rest)

    def walk(self, path: Path, visit):
        """Calls visit(cur_module, segments, is_pub_use, alias) for every path in the file."""
        mod = next(m for m, f in self.modules.items() if f == path)
        toks = self.tokens[path]
        stack = []  # (inline module name, brace depth at its opening)
        depth = 0
        k = 0
        n = len(toks)
        while k < n:
            t = toks[k]
            cur = mod + tuple(name for name, _ in stack)
            if t == "mod" and k + 2 < n and toks[k + 2] == "{":
                stack.append((toks[k + 1], depth))
                depth += 1
                k += 3
                continue
            if t == "{":
                depth += 1
            elif t == "}":
                depth -= 1
                if stack and stack[-1][1] == depth:
                    stack.pop()
            elif t == "use":
                is_pub = k > 0 and (toks[k - 1] == "pub" or toks[k - 1] == ")")
                end = k + 1
                while end < n and toks[end] != ";":
                    end += 1
                for segs, alias in use_paths(toks[k + 1:end]):
                    visit(cur, segs, is_pub, alias)
                k = end + 1
                continue
            elif re.match(r"[A-Za-z_]", t) and (k == 0 or toks[k - 1] not in ("::", ".")):
                segs = [t]
                j = k + 1
                while j + 1 < n and toks[j] == "::" and re.match(r"[A-Za-z_]", toks[j + 1]):
                    segs.append(toks[j + 1])
                    j += 2
                if len(segs) > 1:
                    visit(cur, segs, False, None)
                    k = j
                    continue
            k += 1


def use_paths(toks):
    """Expands a use tree (tokens between `use` and `;`) into (segments, alias) pairs."""
    out = []

    def tree(i, prefix):
        segs = list(prefix)
        while i < len(toks):
            t = toks[i]
            if t == "::":
                i += 1
            elif t == "{":
                i += 1
                while i < len(toks) and toks[i] != "}":
                    i = tree(i, segs)
                    if i < len(toks) and toks[i] == ",":
                        i += 1
                return i + 1
            elif t in (",", "}"):
                break
            elif t == "*":
                out.append((segs, None))
                return i + 1
            elif t == "as":
                out.append((segs, toks[i + 1]))
                return i + 2
            else:
                if t == "self" and segs:
                    pass  # `a::{self}` is `a`
                else:
                    segs.append(t)
                i += 1
        out.append((segs, None))
        return i

    tree(0, [])
    return [(s, a) for s, a in out if s]


def check(src: Path):
    root = next((src / f for f in ROOT_FILES if (src / f).exists()), None)
    if root is None:
        return []
    crates = [Crate(src, root)]
    # A package with both lib.rs and main.rs has two crates; main.rs is the binary's root.
    if root.name == "lib.rs" and (src / "main.rs").exists():
        crates.append(Crate(src, src / "main.rs"))
    cycles = []
    for crate in crates:
        children_of = {}
        for m in crate.modules:
            if m:
                children_of.setdefault(m[:-1], set()).add(m[-1])
        # Re-exports first (two passes reach re-exports of re-exports).
        for _ in range(2):
            for f in crate.tokens:
                table = crate.reexports.setdefault(f, {})

                def record(cur, segs, is_pub, alias, table=table):
                    if not is_pub:
                        return
                    target = crate.resolve(cur, segs, children_of.get(cur, set()))
                    if target:
                        table[alias or segs[-1]] = target

                crate.walk(f, record)
        edges = {f: {} for f in crate.tokens}
        for f in crate.tokens:

            def add(cur, segs, is_pub, alias, f=f):
                target = crate.resolve(cur, segs, children_of.get(cur, set()))
                if target is None:
                    return
                g = crate.file_of(target)
                if g is not None and g != f and not crate.is_ancestor(f, g):
                    edges[f].setdefault(g, "::".join(segs))

            crate.walk(f, add)
        cycles += [(crate, scc, edges) for scc in sccs(edges) if len(scc) > 1]
    return cycles


def sccs(edges):
    """Tarjan's strongly connected components."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def one_cycle(scc, edges):
    """A shortest path from the first file of the component back to itself."""
    start = scc[0]
    members = set(scc)
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges[v]):
            if w not in members:
                continue
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return scc


def self_test():
    """The rules above, on small crates written to a temporary folder."""
    import tempfile

    def cycles_in(files):
        with tempfile.TemporaryDirectory() as d:
            for name, text in files.items():
                (Path(d) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(d) / name).write_text(text)
            return sorted(tuple(p.name for p in scc) for _, scc, _ in check(Path(d)))

    lib = "mod a;\nmod b;\npub use a::Thing;\npub struct Root;\n"
    # Siblings through `use`, through a path in code, through a re-export: cycles.
    assert cycles_in({"lib.rs": lib, "a.rs": "use crate::b::B;", "b.rs": "use super::a;"}) == [("a.rs", "b.rs")]
    assert cycles_in({"lib.rs": lib, "a.rs": "fn f() { crate::b::g() }", "b.rs": "use crate::{x, a::{self, A}};"}) == [("a.rs", "b.rs")]
    assert cycles_in({"lib.rs": lib, "a.rs": "use crate::b::B;", "b.rs": "use crate::Thing;"}) == [("a.rs", "b.rs")]
    # A child reaching into its parent, which uses the child: counted only one way, no cycle.
    assert cycles_in({"lib.rs": lib + "fn f() { a::g() }", "a.rs": "use crate::Root;", "b.rs": ""}) == []
    # Comments, doc comments and strings name modules without importing them.
    quiet = "/// see [`crate::b::B`]\n// crate::b::x\n/* crate::b */ const S: &str = \"crate::b::B\";"
    assert cycles_in({"lib.rs": lib, "a.rs": quiet, "b.rs": "use crate::a::A;"}) == []
    # An inline test module's `super::` is its own file; nested folders resolve.
    assert cycles_in({"lib.rs": "mod s;", "s.rs": "mod x;\nmod y;", "s/x.rs": "mod tests { use super::X; }",
                      "s/y.rs": "use super::x::X;"}) == []
    assert cycles_in({"lib.rs": "mod s;", "s.rs": "mod x;\nmod y;", "s/x.rs": "use super::y::Y;",
                      "s/y.rs": "use super::x::X;"}) == [("x.rs", "y.rs")]
    print("check-import-cycles self-test passed")


def main():
    repo = Path(__file__).resolve().parent.parent
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        return
    if len(sys.argv) > 1:
        dirs = [Path(a) for a in sys.argv[1:]]
    else:
        members = re.search(r"members\s*=\s*\[([^\]]*)\]", (repo / "Cargo.toml").read_text())
        dirs = [repo / m / "src" for m in re.findall(r'"([^"]+)"', members.group(1))]
    rel = lambda p: str(p.relative_to(repo)) if p.is_relative_to(repo) else str(p)
    found = 0
    for d in dirs:
        for crate, scc, edges in check(d):
            found += 1
            print(f"import cycle in {rel(d)}: " + ", ".join(p.name for p in scc))
            path = one_cycle(scc, edges)
            for a, b in zip(path, path[1:]):
                print(f"    {rel(a)} -> {rel(b)}   (`{edges[a][b]}`)")
    if found:
        print(f"{found} import cycle(s): move what both files need into a third, or merge them")
        sys.exit(1)
    print(f"no import cycles in {len(dirs)} crate(s)")


if __name__ == "__main__":
    main()
