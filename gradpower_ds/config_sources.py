"""The one rule by which an entry point's settings get their values: defaults < a JSON file < flags.

Both entry points that take a settings file and flags use it: the main job
(``gradpower_ds.jobs.train_config``: ``--config FILE.json`` and one flag per setting) and
Megatron-LM (``megatron_patches.arguments``: ``--gradpower-config FILE.json`` and the
``--gradpower-*`` flags). A flag given on the command line wins over the file, the file
over the default; "given" is what the caller's parser saw, never guessed from a value
(a flag repeating the default still beats the file). ``layered`` also says where each
value came from, so an error can name the flag or the file's key the user wrote.
``read_settings_file`` reads the file: a JSON object whose keys are all known (an old
name of p says what replaced it: ``hyperparams.RENAMED``), ``"_comment"`` ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping

from .hyperparams import RENAMED


def layered(defaults: Mapping, from_file: Mapping, from_flags: Mapping, file_label: Callable[[str], str],
            flag_label: Callable[[str], str]) -> tuple[dict, dict[str, str]]:
    """(values, sources): each key's value from the flags, else the file, else the defaults, and for each key not
    left at its default, where its value came from (``flag_label(key)`` or ``file_label(key)``)."""
    values, sources = dict(defaults), {}
    for layer, label in ((from_file, file_label), (from_flags, flag_label)):
        for key, value in layer.items():
            values[key] = value
            sources[key] = label(key)
    return values, sources


def read_settings_file(path: str, accepted: Iterable[str], what: str) -> dict:
    """The settings in the JSON file `path` (`what` names it in messages, e.g. '--config FILE'): ValueError, naming
    it, when it is missing or unreadable, not JSON, not an object, or has keys outside `accepted`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"{what}: file not found (from {os.getcwd()})") from None
    except OSError as error:
        raise ValueError(f"{what}: cannot be read ({error.strerror or error})") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what}: expected a JSON object {{\"key\": value, ...}}, got {type(values).__name__}")
    values.pop("_comment", None)
    accepted = sorted(accepted)
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        hints = "".join(f"; {RENAMED[key]}" for key in unknown if key in RENAMED)
        raise ValueError(f"{what}: unknown key(s) {unknown}; accepted keys are {accepted}{hints}")
    return values
