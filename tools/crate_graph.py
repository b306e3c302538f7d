#!/usr/bin/env python3
"""The crate graph's rules (issue 13), checked from `cargo metadata` and the
sources; run by `./x lint`. Exits 1 naming every broken rule.

1. Zones: the untrusted zone's crates (a storage node runs on hosts we do
   not trust) depend on no trusted-zone crate, not even through another crate.
2. The gateway does not compile the storage node's server to get a client.
3. The core crates (image, cryptomark, segmentation, erasure, DICOM) do no
   I/O of their own: no async runtime, RPC, database or HTTP crate among
   their dependencies.
4. No import circle between the files of a crate: `b.rs` using `crate::a`
   while `a.rs` uses `crate::b` (or a longer ring). Paths through the crate
   root (lib.rs/main.rs re-exports) do not count.

Only normal dependencies count (not dev- or build-dependencies): what ends
up in the shipped binary.
"""

import json
import os
import re
import subprocess
import sys
from collections import defaultdict

UNTRUSTED = {"storage-node"}
TRUSTED = {
    "gateway-service",
    "keyserver",
    "watermark-service",
    "segmentation-service",
    "tessera-devstack",
    "tessera-cli",
}
CORE = {"tessera-image", "tessera-cryptomark", "tessera-segment", "tessera-erasure", "tessera-dicom"}
IO_CRATES = {
    "tokio", "tokio-util", "tokio-stream", "tokio-rustls", "mio", "socket2",
    "tonic", "h2", "hyper", "hyper-util", "tower", "axum", "reqwest",
    "redb", "async-std", "smol", "dicom-ul",
}

# Rules known broken on this branch, each with the issue that removes it.
# A listed rule that passes is reported as stale: delete its line.
KNOWN_EXCEPTIONS: dict = {
    # (rule, crate, other): "issue": a rule known broken, reported not failed.
}
# Crates whose import circles are reported but do not fail the check: their
# restructuring is under way (issue 13); delete a line once its crate is clean.
CIRCLES_REPORTED_ONLY: dict = {
    # "crate": "issue": a crate whose import circles are reported, not failed.
}


def metadata():
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def normal_closure(meta):
    """package name -> set of names it depends on, directly or not (normal deps)."""
    pkgs = {p["id"]: p["name"] for p in meta["packages"]}
    edges = {}
    for node in meta["resolve"]["nodes"]:
        deps = set()
        for d in node["deps"]:
            if any(k["kind"] is None for k in d["dep_kinds"]):
                deps.add(d["pkg"])
        edges[node["id"]] = deps
    closure = {}
    for pid in edges:
        seen, stack = set(), list(edges[pid])
        while stack:
            q = stack.pop()
            if q not in seen:
                seen.add(q)
                stack.extend(edges.get(q, ()))
        closure.setdefault(pkgs[pid], set()).update(pkgs[q] for q in seen)
    return closure


LAYERS = {"crates": 0, "proto": 0, "services": 1, "keyserver": 1, "storage-node": 1, "tools": 2}


def dependency_rules(meta):
    closure = normal_closure(meta)
    members = {p["name"] for p in meta["packages"] if p["id"] in meta["workspace_members"]}
    checks = []  # (rule key, message if broken or None)
    for u in sorted(UNTRUSTED & members):
        for t in sorted(TRUSTED & members):
            bad = t in closure.get(u, set())
            checks.append((("no-dependency", u, t),
                           f"untrusted {u} depends on trusted {t}" if bad else None))
    bad = "storage-node" in closure.get("gateway-service", set())
    checks.append((("no-dependency", "gateway-service", "storage-node"),
                   "gateway-service depends on the storage-node server crate" if bad else None))
    # Layers by folder: foundations (crates/, proto/) < services (services/,
    # keyserver/, storage-node/) < tools (tools/); no arrow points up.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    layer_of = {}
    for p in meta["packages"]:
        if p["id"] in meta["workspace_members"]:
            top = os.path.relpath(p["manifest_path"], root).split(os.sep)[0]
            layer_of[p["name"]] = LAYERS.get(top)
    for a in sorted(members):
        if layer_of[a] is None:
            checks.append((("layer", a, ""), f"{a} lives in a folder with no layer (LAYERS in tools/crate_graph.py)"))
            continue
        up = sorted(b for b in closure.get(a, set()) & members if (layer_of[b] or 0) > layer_of[a])
        checks.append((("layer", a, ""), f"{a} (layer {layer_of[a]}) depends on higher layers {up}" if up else None))
    for c in sorted(CORE & members):
        io = sorted(closure.get(c, set()) & IO_CRATES)
        checks.append((("no-io", c, ""), f"core crate {c} depends on I/O crates {io}" if io else None))
    return checks


# ---- import circles between the files of a crate ----

def strip_comments_and_strings(src):
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    # A raw string starts at an `r` that ends no word (`"keyserver"` ends
    # in r" too: that is a closing quote, not a raw string).
    src = re.sub(r'(?<![\w])r(#*)"(?:.|\n)*?"\1', '""', src)
    src = re.sub(r'"(?:\\.|[^"\\])*"', '""', src)
    return re.sub(r"//[^\n]*", "", src)


def expand_use_tree(text):
    """'a::{b::C, d}' -> [['a','b','C'], ['a','d']] (self/* kept as segments)."""
    text = text.strip()
    m = re.match(r"^([\w:]*?)(?:::)?\{(.*)\}$", text, re.S)
    if not m:
        path = [s for s in re.split(r"\s*::\s*", re.sub(r"\s+as\s+\w+$", "", text)) if s]
        return [path] if path else []
    prefix = [s for s in m.group(1).split("::") if s]
    items, depth, cur = [], 0, ""
    for ch in m.group(2):
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += (ch == "{") - (ch == "}")
        cur += ch
    items.append(cur)
    out = []
    for it in items:
        if it.strip():
            out.extend(prefix + p for p in expand_use_tree(it))
    return out or [prefix]


def module_files(src_dir):
    """module path tuple -> file, for every .rs file under src/ (lib crate root)."""
    mods = {}
    for root, _, files in os.walk(src_dir):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src_dir)[:-3].split(os.sep)
            if rel[0] == "bin":
                continue
            if rel == ["lib"] or rel == ["main"]:
                path = ()
            elif rel[-1] == "mod":
                path = tuple(rel[:-1])
            else:
                path = tuple(rel)
            mods[path] = os.path.join(root, f)
    return mods


def inline_module_spans(src):
    """(start, end) of every inline `mod name { ... }` block (a file's
    `mod tests { use super::*; }`), by brace matching on the stripped text."""
    spans = []
    for m in re.finditer(r"\bmod\s+\w+\s*\{", src):
        depth, i = 0, m.end() - 1
        while i < len(src):
            if src[i] == "{":
                depth += 1
            elif src[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        spans.append((m.start(), i))
    return spans


def inside_inline(path, pos, spans):
    """A path written inside an inline module: its leading `super` names the
    file's own module (one level per enclosing inline block), so it becomes
    `self`; the edge is then to the file's own module, not its parent."""
    depth = sum(1 for a, b in spans if a <= pos <= b)
    p = list(path)
    while depth and p and p[0] == "super":
        p = ["self"] + p[1:] if len(p) == 1 or p[1] != "super" else p[1:]
        depth -= 1
        if p[0] == "self":
            break
    return p


def resolve(mods, path):
    """The longest known module prefix of path (a tuple)."""
    for n in range(len(path), -1, -1):
        if tuple(path[:n]) in mods:
            return tuple(path[:n])
    return ()


def file_edges(src_dir):
    mods = module_files(src_dir)
    # A crate with both lib.rs and main.rs: main.rs is another crate (it uses
    # the library by name), so only the library's files are graphed.
    if os.path.exists(os.path.join(src_dir, "lib.rs")) and os.path.exists(os.path.join(src_dir, "main.rs")):
        mods[()] = os.path.join(src_dir, "lib.rs")
    edges = defaultdict(set)
    for me, path in mods.items():
        src = strip_comments_and_strings(open(path, encoding="utf-8").read())
        children = {m[-1] for m in mods if len(m) == len(me) + 1 and m[: len(me)] == me}
        # the module whose scope `super::` names (a file's parent module)
        parent = me[:-1]
        paths = []
        inline = inline_module_spans(src)
        for u in re.finditer(r"\buse\s+([^;]+);", src):
            paths.extend(inside_inline(p, u.start(), inline) for p in expand_use_tree(u.group(1)))
        for q in re.finditer(r"\b((?:crate|super|self)(?:\s*::\s*\w+)+)", src):
            paths.append(inside_inline(re.split(r"\s*::\s*", q.group(1)), q.start(), inline))
        for c in children:
            if re.search(rf"(?<![\w:]){re.escape(c)}\s*::", src):
                paths.append([c])
        for p in paths:
            if not p:
                continue
            if p[0] == "crate":
                full = p[1:]
            elif p[0] == "super":
                base, rest = list(parent), p[1:]
                while rest and rest[0] == "super":
                    base, rest = base[:-1], rest[1:]
                full = base + rest
            elif p[0] == "self":
                full = list(me) + p[1:]
            elif p[0] in children:
                full = list(me) + p
            else:
                continue
            target = resolve(mods, full)
            if target and target != me:
                edges[me].add(target)
    return mods, edges


def cycles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on, stack, out, n = {}, {}, set(), [], [], [0]
    nodes = set(edges) | {t for v in edges.values() for t in v}

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main():
    meta = metadata()
    failures, notes = [], []
    for key, broken in dependency_rules(meta):
        why = KNOWN_EXCEPTIONS.get(key)
        if broken and why:
            notes.append(f"known exception ({why}): {broken}")
        elif broken:
            failures.append(broken)
        elif why:
            notes.append(f"stale exception, the rule passes now: delete {key} from KNOWN_EXCEPTIONS")
    for p in sorted(meta["packages"], key=lambda p: p["name"]):
        if p["id"] not in meta["workspace_members"]:
            continue
        src_dir = os.path.join(os.path.dirname(p["manifest_path"]), "src")
        if not os.path.isdir(src_dir):
            continue
        _, edges = file_edges(src_dir)
        for comp in cycles(edges):
            ring = " <-> ".join("::".join(m) for m in comp)
            msg = f"{p['name']}: import circle between files: {ring}"
            if p["name"] in CIRCLES_REPORTED_ONLY:
                notes.append(f"reported ({CIRCLES_REPORTED_ONLY[p['name']]}): {msg}")
            else:
                failures.append(msg)
    for n in notes:
        print(f"note: {n}")
    for f in failures:
        print(f"FAIL: {f}")
    if failures:
        print(f"crate graph: {len(failures)} rule(s) broken")
        return 1
    print("crate graph: zones, core crates without I/O, no import circles: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
