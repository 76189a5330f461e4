"""The device runtime in-process on the stand-in backend (the bundle's own modules, imported from an
extracted bundle): one profile switch per question, no KV reallocation, profile bounds enforced with
a message naming the limit and the recipe option, tegrastats parsing."""
import json
import sys

import numpy as np
import pytest

from bundle_helpers import extract


@pytest.fixture(scope="module")
def device(tiny_bundle, tmp_path_factory):
    """The extracted bundle with its ``mlrt``/``mldevice`` packages importable (removed afterwards)."""
    folder = extract(tiny_bundle, tmp_path_factory.mktemp("rt"))
    sys.path.insert(0, str(folder))
    try:
        from mldevice.runtime import open_device_vlm

        yield folder, open_device_vlm(folder / "artifact", standin=True)
    finally:
        sys.path.remove(str(folder))
        for m in [m for m in sys.modules if m.split(".")[0] in ("mlrt", "mldevice")]:
            del sys.modules[m]


def _questions(folder):
    return json.loads((folder / "reference" / "answers.json").read_text())


def test_answers_match_the_host_with_one_profile_switch_and_no_reallocation(device):
    from mldevice.backends import HostBuffer
    from mlrt.imaging import load_image

    folder, vlm = device
    dec = vlm.engine_decoder
    kv_ids = [id(b.array) for s in dec.kv for b in s]
    allocs = HostBuffer.allocations
    qs = _questions(folder)
    for q in qs["questions"]:
        dec.profile_log.clear()
        got = vlm.answer(load_image(folder / q["image"]), q["question"], max_new_tokens=qs["max_new_tokens"])
        assert got == q["host_answer"]
        log = dec.profile_log
        assert log[0] == "prefill" and set(log[1:]) == {"decode"} and len(log) > 2
        assert sum(a != b for a, b in zip(log, log[1:])) == 1          # exactly one switch: prefill -> decode
    assert HostBuffer.allocations == allocs                            # nothing allocated while answering
    assert [id(b.array) for s in dec.kv for b in s] == kv_ids          # the same two KV buffer sets throughout


def test_a_prompt_over_the_prefill_profile_names_the_limit_and_the_recipe_option(device):
    from mldevice.backends import ProfileError
    from mlrt.imaging import load_image

    folder, vlm = device
    q = _questions(folder)["questions"][0]
    long_q = " ".join(["lesion"] * 400)
    with pytest.raises(ProfileError) as e:
        vlm.answer(load_image(folder / q["image"]), long_q, max_new_tokens=4)
    dec = vlm.engine_decoder
    msg = str(e.value)
    assert f"at most {dec.max_seq} tokens" in msg and "max_prompt_tokens" in msg and "stages -> engines" in msg
    with pytest.raises(ProfileError, match="max_new_tokens"):
        vlm.answer(load_image(folder / q["image"]), q["question"], max_new_tokens=dec.max_past)


def test_stand_in_refuses_shapes_outside_the_active_profile_as_tensorrt_does(device):
    from mldevice.backends import ProfileError

    folder, vlm = device
    dec = vlm.engine_decoder
    eng = dec.engine
    eng.select_profile(dec.p_decode)
    hidden = eng.profile_bounds(dec.p_decode)["inputs_embeds"]["max"][2]
    assert eng.set_input_shape("inputs_embeds", (1, 1, hidden))
    assert not eng.set_input_shape("inputs_embeds", (1, 2, hidden))       # decode takes one token
    eng.select_profile(dec.p_prefill)
    assert not eng.set_input_shape("inputs_embeds", (1, dec.max_seq + 1, hidden))
    # the decoder call itself refuses (bypassing the up-front check), naming the profile bound
    x = np.zeros((1, dec.max_seq + 1, hidden), np.float16)
    past = [np.zeros((1, dec.kvh, 1, dec.hd), np.float16) for _ in dec.past_names]
    with pytest.raises(ProfileError, match=f"dimension 1 is {dec.max_seq + 1}, profile allows 1..{dec.max_seq}"):
        dec(x, np.ones((1, dec.max_seq + 2), np.int32), np.zeros((1, dec.max_seq + 1), np.int32), past)


# tegrastats lines in the JetPack 5.1 (L4T r35) format of NVIDIA's "tegrastats" statistics table:
# AGX Xavier prints per-rail current/average power without VDD_IN; Xavier NX prints VDD_IN. Written
# from that documented format (no Jetson was available to record them); the JetPack 4 style line
# (no mW units) is the format of a public test fixture of a Jetson monitoring project.
AGX = ("12-07-2026 17:00:01 RAM 5120/31002MB (lfb 6340x4MB) SWAP 0/15501MB (cached 0MB) CPU [12%@2265,8%@2265,"
       "off,off,off,off,off,off] EMC_FREQ 31%@2133 GR3D_FREQ 87%@[1377] VIC_FREQ 115 APE 150 CV0@-256C CPU@48.5C "
       "SOC2@45.1C SOC0@46.2C CV1@-256C GPU@47C tj@48.5C SOC1@44.3C CV2@-256C GPU 9125mW/7011mW CPU 1388mW/1200mW "
       "SOC 2930mW/2800mW CV 0mW/0mW VDDRQ 1544mW/1400mW SYS5V 3412mW/3300mW")
NX = ("RAM 3010/7772MB (lfb 12x4MB) SWAP 0/3886MB (cached 0MB) CPU [30%@1420,25%@1420,off,off,off,off] "
      "EMC_FREQ 45%@1600 GR3D_FREQ 99%@[1100] APE 150 AUX@39C CPU@41.5C thermal@40.9C GPU@41C "
      "VDD_IN 11240mW/9800mW VDD_CPU_GPU_CV 5920mW/5000mW VDD_SOC 1630mW/1600mW")
JP4 = ("RAM 1545/31919MB (lfb 7400x4MB) SWAP 2/15959MB (cached 1MB) CPU [0%@1190,1%@1190] EMC_FREQ 1%@408 "
       "GR3D_FREQ 12%@318 GPU 120/100 CPU 468/450 SOC 937/900 CV 0/0 VDDRQ 312/234 SYS5V 1458/1400")


def test_tegrastats_lines_give_watts_ram_and_gpu_load(device):
    from mldevice import tegra

    agx, nx, jp4 = tegra.parse_line(AGX), tegra.parse_line(NX), tegra.parse_line(JP4)
    assert agx["ram_mb"] == 5120 and agx["gpu_load_pct"] == 87
    assert agx["watts"] == pytest.approx((9125 + 1388 + 2930 + 0 + 1544 + 3412) / 1000)
    assert "no VDD_IN" in agx["watts_from"]
    assert nx["watts"] == 11.24 and nx["watts_from"] == "VDD_IN" and nx["gpu_load_pct"] == 99
    assert jp4["rails_mw"] == {"GPU": 120, "CPU": 468, "SOC": 937, "CV": 0, "VDDRQ": 312, "SYS5V": 1458}
    s = tegra.summarize([agx, tegra.parse_line(AGX.replace("RAM 5120", "RAM 6000"))])
    assert s["peak_ram_gb"] == pytest.approx(6000 * 1.048576 / 1000, abs=1e-3) and s["samples"] == 2
    assert tegra.summarize([], sampling=False)["watts"] == "not a Jetson"
