"""The layering of nanotulu, read from the source (ast, nothing imported): scripts on top, a library below.

Rules:
1. nothing below the scripts (train_*.py, pipeline.py) imports a script;
2. model.py imports nothing from nanotulu (the model knows nothing of training or parallelism);
3. only parallel.py touches FSDP / DTensor / device meshes, besides checkpoint.py (DCP: sharded state dicts) and
   losses.py (the vocab-parallel weight of the loss head);
4. no import circle inside nanotulu/ (every import counts, also those inside functions);
5. bench/ never imports a script; a test imports a script only to test the script itself (its main, config and
   presets): every algorithm a test checks comes from the library.
Each rule is also run on a small made-up package that breaks it, so a rule that cannot fail is caught too.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"nanotulu.train_sft", "nanotulu.train_dpo", "nanotulu.train_rm", "nanotulu.train_rlvr", "nanotulu.pipeline"}
# what a test may take from a script: the script's own surface, tested as a script
SCRIPT_SURFACE = {"main", "SFTConfig", "DPOConfig", "RMConfig", "RLVRConfig", "EMBEDDED_PRESET", "EMBEDDED_PPO_PRESET",
                  "PPO_RECIPE", "variant_defaults", "load_tasks"}
PLACEMENT = {"nanotulu.parallel", "nanotulu.checkpoint", "nanotulu.losses"}  # may touch FSDP / DTensor
PLACEMENT_MODULES = ("torch.distributed.fsdp", "torch.distributed.tensor", "torch.distributed.device_mesh",
                     "torch.distributed._composable", "torch.distributed.checkpoint",
                     "torch.distributed.algorithms._checkpoint")
PLACEMENT_NAMES = {"DTensor", "FSDPModule", "fully_shard", "full_tensor", "to_local", "init_device_mesh", "DeviceMesh"}


PACKAGES = set()  # the module names that are packages (their __init__.py), for relative imports


def module_files(root=ROOT):
    """{module name: source text} of nanotulu/ (kernels/ as nanotulu.kernels.*, through the link)."""
    out = {}
    for folder, prefix in ((os.path.join(root, "nanotulu"), "nanotulu"), (os.path.join(root, "kernels"),
                                                                           "nanotulu.kernels")):
        for dirpath, dirnames, files in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d not in ("kernels", "__pycache__", "assets")]
            rel = os.path.relpath(dirpath, folder)
            pkg = prefix if rel == "." else prefix + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    name = pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"
                    if f == "__init__.py":
                        PACKAGES.add(name)
                    with open(os.path.join(dirpath, f)) as fh:
                        out[name] = fh.read()
    return out


def imports(source, known, module="", is_package=False):
    """[(imported module, names taken from it)] of one file's source (the file of `module`, for relative imports):
    every import statement, nested ones too. `from nanotulu import x` is module nanotulu.x when that is a module
    of `known`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, set()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y: relative to the file's package
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            subs = [a.name for a in node.names if f"{base}.{a.name}" in known]
            found += [(f"{base}.{s}", set()) for s in subs]
            rest = {a.name for a in node.names if a.name not in subs}
            if rest:
                found.append((base, rest))
    return found


def internal_graph(files):
    """{module: set of nanotulu modules it imports}."""
    return {m: {t for t, _ in imports(src, files, m, m in PACKAGES) if t in files and t != m}
            for m, src in files.items()}


def violations(files):
    """The broken rules 1-4 of a {module: source} package, as readable lines."""
    out = []
    graph = internal_graph(files)
    for m, deps in sorted(graph.items()):
        if m not in SCRIPTS:
            out += [f"{m} imports the script {d}" for d in sorted(deps & SCRIPTS)]
    if "nanotulu.model" in graph:
        out += [f"nanotulu.model imports {d}" for d in sorted(graph["nanotulu.model"])]
    for m, src in sorted(files.items()):
        if m in PLACEMENT:
            continue
        touched = {t for t, _ in imports(src, files, m) if t.startswith(PLACEMENT_MODULES)}
        tree = ast.parse(src)
        touched |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in PLACEMENT_NAMES}
        touched |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in PLACEMENT_NAMES}
        out += [f"{m} touches {t} (FSDP / DTensor belong in parallel.py)" for t in sorted(touched)]
    out += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
    return out


def circles(graph):
    """Every strongly connected group of more than one module (Tarjan), each as a closed path of its names."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group) + [sorted(group)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_library_keeps_its_layers():
    files = module_files()
    assert "nanotulu.algos.dpo" in files and "nanotulu.kernels.chunked_loss" in files  # the walk sees everything
    bad = violations({m: s for m, s in files.items() if not m.startswith("nanotulu.kernels")})
    assert not bad, "\n".join(bad)


def test_kernels_stay_below_the_library():
    """kernels/ imports nothing of nanotulu but its own files. Its inner layering (the chunked_loss <->
    linear_logprobs circle of issue 28) is the kernels' own work, checked there."""
    files = module_files()
    bad = [f"{m} imports {d}" for m, deps in internal_graph(files).items() if m.startswith("nanotulu.kernels")
           for d in deps if not d.startswith("nanotulu.kernels")]
    assert not bad, "\n".join(bad)


def test_bench_and_tests_use_the_library_not_the_scripts():
    files = module_files()
    bad = []
    for folder in ("bench", "tests"):
        for f in sorted(os.listdir(os.path.join(ROOT, folder))):
            if not f.endswith(".py"):
                continue
            with open(os.path.join(ROOT, folder, f)) as fh:
                src = fh.read()
            aliases = set()  # names a script module is bound to in this file
            for mod, names in imports(src, files):
                if mod not in SCRIPTS:
                    continue
                if folder == "bench":
                    bad.append(f"{folder}/{f} imports the script {mod}")
                else:
                    bad += [f"{folder}/{f} takes {n} from the script {mod}" for n in sorted(names - SCRIPT_SURFACE)]
                    aliases.add(mod.rsplit(".", 1)[1])
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, ast.ImportFrom) and node.module == "nanotulu":
                    aliases |= {a.asname for a in node.names if a.asname and f"nanotulu.{a.name}" in SCRIPTS}
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                        node.value.id in aliases and node.attr not in SCRIPT_SURFACE:
                    bad.append(f"{folder}/{f} uses {node.value.id}.{node.attr} of a script")
    assert not bad, "\n".join(bad)


def test_each_rule_catches_a_break():
    """A made-up package breaking each rule once: every break is reported (the checks can fail)."""
    files = {
        "nanotulu.model": "from nanotulu import data\n",
        "nanotulu.data": "import torch\n",
        "nanotulu.train_dpo": "from nanotulu import data\n",
        "nanotulu.algos.dpo": "def f():\n    from nanotulu.train_dpo import main\n",
        "nanotulu.eval": "from torch.distributed.tensor import DTensor\n",
        "nanotulu.generate": "def g(p):\n    return p.full_tensor()\n",
        "nanotulu.parallel": "from torch.distributed.fsdp import fully_shard\n",  # allowed here
        "nanotulu.a": "from nanotulu import b\n",
        "nanotulu.b": "def h():\n    import nanotulu.a\n",
    }
    bad = violations(files)
    assert "nanotulu.algos.dpo imports the script nanotulu.train_dpo" in bad
    assert "nanotulu.model imports nanotulu.data" in bad
    assert any(b.startswith("nanotulu.eval touches torch.distributed.tensor") for b in bad)
    assert any(b.startswith("nanotulu.generate touches full_tensor") for b in bad)
    assert "import circle: nanotulu.a -> nanotulu.b -> nanotulu.a" in bad
    assert not any(b.startswith("nanotulu.parallel") for b in bad)
    assert len(bad) == 5, bad
