"""The floor plan: three wings (library, integrations, jobs), no import loops, one patching mechanism, one home for
AdamPower's defaults and for the names of p, one check and one precedence rule, kernels named alike in ops/, tests/
and benchmarks/."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gradpower_ds.patching import Add, Extend, Package, PatchSet, UnsupportedVersionError, Wrap

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gradpower_ds", "megatron_patches")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at module level or inside functions (lazy imports count)."""
    modules = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg's __init__
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_loops():
    graph = import_graph()
    assert {"gradpower_ds.functional", "gradpower_ds.ops.native_adam_power", "megatron_patches.patches"} <= set(graph)
    assert "gradpower_ds.optimizer_base" in graph["gradpower_ds.cpu_adam_power"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_lazy_loops():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


JOBS = "gradpower_ds.jobs"
CLI = "gradpower_ds.__main__"  # the command line of the jobs wing: its commands import their job when run


def test_the_library_and_the_integrations_never_import_the_jobs():
    graph = import_graph()
    assert {f"{JOBS}.train", f"{JOBS}.model", "gradpower_ds.deepspeed", "gradpower_ds.deepspeed.muon_power"} \
        <= set(graph)
    assert f"{JOBS}.train" in graph[CLI]  # the check below sees lazy imports
    for name, edges in graph.items():
        if name.startswith(JOBS) or name == CLI:
            continue
        assert not {e for e in edges if e == JOBS or e.startswith(JOBS + ".")}, (name, edges)


def test_the_wings_are_folders():
    """The library's modules sit in gradpower_ds/ (kernels in ops/, csrc/), the DeepSpeed integration in
    gradpower_ds/deepspeed/, the jobs in gradpower_ds/jobs/, Megatron's in megatron_patches/."""
    library = {p.stem for p in (ROOT / "gradpower_ds").glob("*.py")}
    assert {"train", "train_config", "compare", "run", "advise", "train_megatron", "model", "data", "metrics",
            "run_dir"}.isdisjoint(library), library
    assert {"power", "functional", "adam_power", "cpu_adam_power", "gpas", "blockwise", "noise", "hyperparams",
            "patching", "versions", "config_sources"} <= library
    assert (ROOT / "gradpower_ds" / "deepspeed" / "__init__.py").is_file()
    assert (ROOT / "gradpower_ds" / "jobs" / "train.py").is_file() and (ROOT / "megatron_patches" / "patches.py").is_file()


BLOCKED = ("tqdm", "matplotlib", "tensorboard")
_LIBRARY_WITHOUT_THE_EXTRA = """
import sys
for name in {blocked!r}:  # unimportable, as in an environment without them (importlib's convention: None)
    sys.modules[name] = None
import torch
import gradpower_ds
param = torch.nn.Parameter(torch.ones(3))
opt = gradpower_ds.AdamPower([param], lr=0.1)
param.grad = torch.full((3,), 0.5)
opt.step()
assert torch.all(param < 1), param
import gradpower_ds.deepspeed, megatron_patches  # the integrations import no job either
del sys.modules["tqdm"]  # DeepSpeed's own dependency: present wherever DeepSpeed is installed
gradpower_ds.deepspeed.register()
assert gradpower_ds.deepspeed.is_registered()
print(sorted(m for m, module in sys.modules.items() if m.split(".")[0] in {blocked!r} and module is not None
             and m.split(".")[0] != "tqdm"))
"""


def test_the_library_works_without_the_jobs_extra():
    """`import gradpower_ds`, an optimizer step, importing the integrations and the DeepSpeed registration, with
    tqdm, matplotlib and tensorboard unimportable (tqdm allowed back for DeepSpeed, which depends on it), and none of
    them loaded. (torch.hub imports tqdm whenever it is installed, hence the refusal rather than a look at
    sys.modules: torch does without it.) tests/test_install.py checks a real install without the extra."""
    out = subprocess.run([sys.executable, "-c", _LIBRARY_WITHOUT_THE_EXTRA.format(blocked=BLOCKED)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_a_job_without_the_extra_says_what_to_install(monkeypatch):
    from gradpower_ds import jobs

    real = jobs.importlib.util.find_spec
    monkeypatch.setattr(jobs.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    with pytest.raises(SystemExit, match=r"gradpower_ds.jobs.train needs the jobs extra, which is not installed here "
                                         r"\(missing: matplotlib\): pip install \"gradpower-ds\[jobs\]\""):
        jobs.require_extra("gradpower_ds.jobs.train")
    setup_py = (ROOT / "setup.py").read_text()
    install_requires = setup_py.split("install_requires=")[1].split("\n")[0]
    assert '"jobs": list(jobs.EXTRA)' in setup_py and not set(jobs.EXTRA) & set(eval(install_requires.rstrip(",")))


def test_each_kernel_has_a_test_and_a_benchmark_of_its_name():
    kernels = [p.stem for p in (ROOT / "gradpower_ds" / "ops").glob("*.py") if p.stem not in ("__init__", "builder")]
    assert sorted(kernels) == ["native_adam_power", "triton_adam_power"]
    for stem in kernels:
        assert (ROOT / "tests" / f"test_{stem}.py").is_file(), stem
        assert (ROOT / "benchmarks" / f"bench_{stem}.py").is_file(), stem
    assert [p.stem for p in (ROOT / "gradpower_ds" / "csrc").glob("*.cpp")] == ["native_adam_power"]


def _calls(name: str) -> list[str]:
    """'module:line' of every call of function `name` in the library, the integrations and the jobs."""
    found = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
                    found.append(f"{_module_name(path)}:{node.lineno}")
    return sorted(found)


def test_values_are_checked_once_at_each_boundary():
    """One check (hyperparams.check_settings), called at the places where values enter: an optimizer's param group,
    grad_power's p, a DeepSpeed config's params (where the main job checks its settings too), Megatron's config
    and our flags, and Megatron's own Adam flags at parse."""
    modules = [site.split(":")[0] for site in _calls("check_settings")]
    assert modules == ["gradpower_ds.deepspeed.params", "gradpower_ds.optimizer_base", "gradpower_ds.power",
                       "megatron_patches.arguments", "megatron_patches.optimizer"], modules
    for gone in ("check_power", "check_group", "check_powers"):
        assert _calls(gone) == [], gone


def test_one_precedence_rule():
    """The main job and Megatron-LM's flags both take their values through config_sources.layered."""
    assert [site.split(":")[0] for site in _calls("layered")] == ["gradpower_ds.jobs.train_config",
                                                                  "megatron_patches.arguments"]
    from gradpower_ds.config_sources import layered

    values, sources = layered({"a": 1, "b": 2, "c": 3}, {"b": 20, "c": 30}, {"c": 300}, "file {}".format,
                              "--{}".format)
    assert values == {"a": 1, "b": 20, "c": 300} and sources == {"b": "file b", "c": "--c"}


def test_one_vocabulary_of_p():
    """Every entry point's names of p derive from hyperparams.POWER_NAMES and mean the same thing: DeepSpeed's params,
    the main job's settings (which are DeepSpeed's params), Megatron's flags, JSON keys and OptimizerConfig fields."""
    from gradpower_ds.deepspeed.params import ADAM_POWER_PARAMS, MUON_POWER_PARAMS
    from gradpower_ds.hyperparams import POWER_NAMES, RENAMED
    from gradpower_ds.jobs.train_config import OPTIMIZER_SETTINGS, TrainConfig
    from megatron_patches.arguments import CONFIG_KEYS, FLAGS
    from megatron_patches.optimizer import FIELDS

    assert list(POWER_NAMES) == ["power", "adam_power", "expert_power"]
    assert {"power", "expert_power"} <= set(ADAM_POWER_PARAMS) and "adam_power" not in ADAM_POWER_PARAMS
    assert {"power", "adam_power"} <= set(MUON_POWER_PARAMS) and "expert_power" not in MUON_POWER_PARAMS
    assert {k: OPTIMIZER_SETTINGS[k] for k in POWER_NAMES} == {"power": ("adampower", "muonpower"),
                                                              "adam_power": ("muonpower",),
                                                              "expert_power": ("adampower",)}
    assert list(FIELDS) == ["gradpower_p", "gradpower_p_adam", "gradpower_p_expert"] and set(FIELDS) <= set(CONFIG_KEYS)
    assert [FLAGS[f] for f in FIELDS] == [entry.megatron_flag for entry in POWER_NAMES.values()]
    # the same word, the same meaning: muonpower's power is the p before Muon's momentum in all three
    ds = TrainConfig(optimizer="muonpower", power=0.9, grad_clip=0.0).deepspeed_config()["optimizer"]["params"]
    assert (ds["power"], ds["adam_power"]) == (0.9, 1.2)
    assert set(RENAMED) == {"muon_power"} and not set(RENAMED) & {f.name for f in dataclasses.fields(TrainConfig)}


def test_kernels_do_not_import_the_optimizers():
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith("gradpower_ds.ops"):
            assert not edges & {"gradpower_ds.adam_power", "gradpower_ds.cpu_adam_power", "gradpower_ds.optimizer_base",
                                "gradpower_ds.functional", "gradpower_ds"}, (name, edges)


def test_one_default_power_everywhere():
    from gradpower_ds import grad_power, grad_power_
    from gradpower_ds.jobs.compare import parse_variant
    from gradpower_ds.hyperparams import ADAM_POWER_DEFAULTS
    from gradpower_ds.optimizer_base import AdamPowerBase
    from gradpower_ds.jobs.train_config import TrainConfig
    from megatron_patches.optimizer import checked_powers

    p = ADAM_POWER_DEFAULTS["power"]
    assert p == 1.2
    assert TrainConfig().power == p and parse_variant("adampower") == ("adampower", p)
    # megatron_patches: gradpower_p is None until resolved (muonpower has no default), then AdamPower's p
    unset = dict(gradpower_p=None, gradpower_p_expert=None, gradpower_p_adam=None)
    assert checked_powers(unset, "adampower") == {"power": p, "expert_power": p}
    assert checked_powers({**unset, "gradpower_p": 0.9}, "muonpower")["adam_power"] == p
    for fn, arg in ((grad_power, "p"), (grad_power_, "p"), (AdamPowerBase.__init__, "power")):
        assert inspect.signature(fn).parameters[arg].default == p, fn


# ---- gradpower_ds.patching ----------------------------------------------------------------------------------------

class Target:
    def method(self):
        return "original"


class Child(Target):
    pass


@pytest.fixture(autouse=True)
def thing(monkeypatch):
    """A stand-in package `thing` at version 1.0."""
    module = types.ModuleType("thing")
    module.__version__ = "1.0"
    monkeypatch.setitem(sys.modules, "thing", module)
    return module


def _set(patches, oldest="1.0", newest="1.0"):
    package = Package("Thing", module="thing", dist="thing", oldest=oldest, newest=newest)
    return PatchSet("tests", package, "it patches things", lambda: patches)


def test_patch_set_applies_and_undoes_every_kind():
    registry = ["a"]
    wrap = lambda original: lambda self: "patched+" + original(self)  # noqa: E731
    patches = _set([Wrap(Target, "method", wrap), Wrap(Child, "method", lambda o: lambda self: "child"),
                    Add(Target, "extra", 3), Extend(registry, ("b", "c"), "registry")])
    patches.apply()
    patches.apply()  # idempotent
    assert patches.is_applied()
    assert (Target().method(), Child().method(), Target.extra, registry) == ("patched+original", "child", 3,
                                                                            ["a", "b", "c"])
    assert len(patches.describe()) == 4 and "Target.method wrapped by" in patches.describe()[0]
    patches.remove()
    patches.remove()
    assert not patches.is_applied() and patches.describe() == []
    assert (Target().method(), Child().method(), hasattr(Target, "extra"), registry) == ("original", "original",
                                                                                         False, ["a"])
    assert "method" not in vars(Child)  # inherited again, not copied


def test_patch_set_undoes_a_partial_apply():
    registry = []
    patches = _set([Extend(registry, ("x",), "registry"), Add(Target, "method", 1)])  # Target has a method
    with pytest.raises(RuntimeError, match="already has method"):
        patches.apply()
    assert registry == [] and not patches.is_applied() and Target().method() == "original"


def test_patch_set_refuses_another_version(thing):
    registry = []
    patches = _set([Extend(registry, ("x",), "registry")])
    thing.__version__ = "2.0"
    with pytest.raises(UnsupportedVersionError, match=r"tests supports Thing 1\.0 only \(it patches things\), but "
                                                      r"Thing 2\.0 is installed: pip install \"thing==1\.0\" \(or set "
                                                      r"GRADPOWER_ALLOW_UNTESTED=1"):
        patches.apply()
    assert registry == [] and not patches.is_applied()


@pytest.mark.parametrize("version, tested", [("0.9.9", False), ("1.0", True), ("1.3.2", True), ("1.3.2+cu130", True),
                                             ("1.5", True), ("1.5.1", False), ("2.0", False)])
def test_tested_range_includes_both_ends(thing, version, tested):
    thing.__version__ = version
    patches = _set([], oldest="1.0", newest="1.5")
    assert patches.package.is_tested(version) is tested
    if tested:
        patches.check_version()
    else:
        with pytest.raises(UnsupportedVersionError, match=r"supports Thing 1\.0 through 1\.5 \(.*"
                                                          r"pip install \"thing>=1\.0,<=1\.5\""):
            patches.check_version()


@pytest.mark.parametrize("version, at_least", [("0.17.6", False), ("0.18.0", True), ("0.18.0+cu130", True),
                                               ("0.19.8", True)])
def test_installed_at_least_names_a_features_first_version(thing, version, at_least):
    thing.__version__ = version
    assert _set([]).package.installed_at_least("0.18.0") is at_least


def test_extras_are_the_tested_ranges():
    """setup.py's extras and the patch sets' checks come from gradpower_ds/versions.py: one range each."""
    from gradpower_ds import versions
    from gradpower_ds.deepspeed import DEEPSPEED
    from megatron_patches import MEGATRON_CORE

    for package in (DEEPSPEED, MEGATRON_CORE):
        assert (package.oldest, package.newest) == versions.TESTED[package.dist]
        assert package.requirement == versions.requirement(package.dist)
    assert versions.requirement("deepspeed") == "deepspeed>=0.16.0,<=0.19.8"
    setup_py = (Path(__file__).parent.parent / "setup.py").read_text()
    assert 'versions.requirement("deepspeed")' in setup_py and 'versions.requirement("megatron-core")' in setup_py


def test_allow_untested_patches_with_one_warning(thing, monkeypatch):
    registry = []
    patches = _set([Extend(registry, ("x",), "registry")])
    thing.__version__ = "2.0"
    monkeypatch.setenv("GRADPOWER_ALLOW_UNTESTED", "1")
    # a handler on the logger itself sees each record once, whatever handlers earlier tests left up the chain
    records, logger = [], logging.getLogger("gradpower_ds.patching")
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    monkeypatch.setattr(logger, "level", logging.WARNING)
    logger.addHandler(handler)
    try:
        patches.apply()
        patches.remove()
        patches.apply()
    finally:
        logger.removeHandler(handler)
    assert registry == ["x"] and patches.is_applied()
    warnings = [r.getMessage() for r in records]
    assert len(warnings) == 1 and "Thing 2.0 is installed; patching it anyway because GRADPOWER_ALLOW_UNTESTED=1" \
        in warnings[0]
    patches.remove()
    monkeypatch.setenv("GRADPOWER_ALLOW_UNTESTED", "0")  # only "1" opens the door
    with pytest.raises(UnsupportedVersionError):
        patches.apply()


def test_both_integrations_are_patch_sets():
    import megatron_patches
    from gradpower_ds import deepspeed

    assert isinstance(deepspeed.PATCHES, PatchSet) and isinstance(megatron_patches.PATCHES, PatchSet)
    assert issubclass(deepspeed.UnsupportedDeepSpeedError, UnsupportedVersionError)
    assert issubclass(megatron_patches.UnsupportedMegatronError, UnsupportedVersionError)
    import deepspeed as ds

    deepspeed.register()
    try:
        assert [line.split(" ")[0] for line in deepspeed.PATCHES.describe()] == [
            "deepspeed.runtime.config.DEEPSPEED_OPTIMIZERS", "deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS",
            "DeepSpeedEngine._configure_basic_optimizer",
            "ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir",
            "DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3",
            "deepspeed.runtime.lr_schedules.update_lr",
            *(["deepspeed.set_optimizer_flags"] if hasattr(ds, "set_optimizer_flags") else []),  # DeepSpeed with Muon
            "DeepSpeedZeroOptimizer.unscale_and_clip_grads", "DeepSpeedZeroOptimizer_Stage3.unscale_and_clip_grads",
            "DeepSpeedZeroOptimizer_Stage3._optimizer_step",
            "DeepSpeedZeroOptimizer_Stage3._reassign_or_swap_out_partitioned_parameters",
            "TorchBackend.__init__", "TorchBackend.new_group", "DeepSpeedEngine.save_checkpoint",
            "DeepSpeedEngine.load_checkpoint", "TorchCheckpointEngine.load"]
    finally:
        deepspeed.unregister()
