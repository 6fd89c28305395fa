"""The floor plan: no import loops, one patching mechanism, one home for AdamPower's defaults."""

from __future__ import annotations

import ast
import inspect
import logging
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
    assert {"gradpower_ds.functional", "gradpower_ds.ops.native", "megatron_patches.patches"} <= set(graph)
    assert "gradpower_ds.optimizer_base" in graph["gradpower_ds.cpu_adam_power"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_lazy_loops():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_do_not_import_the_optimizers():
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith("gradpower_ds.ops"):
            assert not edges & {"gradpower_ds.adam_power", "gradpower_ds.cpu_adam_power", "gradpower_ds.optimizer_base",
                                "gradpower_ds.functional", "gradpower_ds"}, (name, edges)


def test_one_default_power_everywhere():
    from gradpower_ds import grad_power, grad_power_
    from gradpower_ds.compare import parse_variant
    from gradpower_ds.hyperparams import ADAM_POWER_DEFAULTS
    from gradpower_ds.optimizer_base import AdamPowerBase
    from gradpower_ds.train_config import TrainConfig
    from megatron_patches.optimizer import muon_powers, powers

    p = ADAM_POWER_DEFAULTS["power"]
    assert p == 1.2
    assert TrainConfig().power == p and parse_variant("adampower") == ("adampower", p)
    # megatron_patches: gradpower_p is None until resolved (muonpower has no default), then AdamPower's p
    unset = types.SimpleNamespace(gradpower_p=None, gradpower_p_expert=None, gradpower_p_adam=None)
    assert powers(unset) == (p, p) and muon_powers(types.SimpleNamespace(**{**vars(unset), "gradpower_p": 0.9}))[2] == p
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
            "DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3",
            "deepspeed.runtime.lr_schedules.update_lr",
            *(["deepspeed.set_optimizer_flags"] if hasattr(ds, "set_optimizer_flags") else [])]  # DeepSpeed with Muon
    finally:
        deepspeed.unregister()
