"""This package's version and the tested version ranges of the packages gradpower-ds patches, in one place.

``setup.py`` reads this file by path for its extras (``.[deepspeed]``, ``.[megatron]``), and the
patch sets (``gradpower_ds.deepspeed.DEEPSPEED``, ``megatron_patches.MEGATRON_CORE``) check the
installed version against it. Both ends of each range run the integration tests in CI
(``tests/run.sh``: the newest in ``requirements-test.txt``, the oldest in
``requirements-test-oldest.txt``). No imports here: setup.py loads it without the package's needs.
"""

VERSION = "0.1.0"  # gradpower-ds's own (setup.py, gradpower_ds.__version__, the Triton kernel's verdict cache)

TESTED = {
    # dist name: (oldest, newest), both tested, both included
    "deepspeed": ("0.16.0", "0.19.8"),
    "megatron-core": ("0.13.0", "0.19.2"),
}


def requirement_for(dist: str, oldest: str, newest: str) -> str:
    """The pip requirement for versions `oldest` through `newest` of `dist`: 'deepspeed>=0.16.0,<=0.19.8'."""
    return f"{dist}=={oldest}" if oldest == newest else f"{dist}>={oldest},<={newest}"


def requirement(dist: str) -> str:
    """The pip requirement for the tested range of `dist` (setup.py's extras)."""
    return requirement_for(dist, *TESTED[dist])
