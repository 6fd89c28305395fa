"""DeepSpeed "type": "AdamW" checkpoints resume under "type": "AdamPower" (ZeRO-2/3, with and without offload).

One 2-rank launch of tests/jobs/ds_adamw_state.py. The AdamW checkpoint's param groups lack AdamPower's
settings; the load fills them from the AdamPower config (AdamPowerBase.load_state_dict). With power 1.0
(Adam) the resumed run then ends where the AdamW run went on (to fp32 rounding: another kernel); with 1.2
it steps with p = 1.2 (its groups say so, and its params differ from AdamW's).
"""

from pathlib import Path

import pytest
import torch

from conftest import torchrun
from jobs import ds_adamw_state as job

pytestmark = pytest.mark.slow
NAMES = [job.case_name(*case) for case in job.CASES]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("adamw")
    torchrun(Path(__file__).parent / "jobs" / "ds_adamw_state.py", root, root / "out.pt")
    return torch.load(root / "out.pt", weights_only=False)


@pytest.mark.parametrize("name", NAMES)
def test_adamw_checkpoint_resumes_as_adampower(results, name):
    res = results[name]
    assert res["optimizer"] == "AdamW"  # torch's, on the CPU copy too: the checkpoint really is another optimizer's
    for group in res["groups 1.2"]:
        assert group["power"] == 1.2 and group["power_eps"] == 0.0 and group["adam_w_mode"] is True
    for key, adamw in res["adamw"].items():
        torch.testing.assert_close(res[1.0][key], adamw, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(res[1.2][k], res["adamw"][k], rtol=1e-5, atol=1e-6) for k in res["adamw"])
