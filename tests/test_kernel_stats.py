"""eval.kernel_stats on the CPU: our Triton kernels compile for sm_90 without a GPU, and the table reports their
registers and SASS instruction mix; bad options are refused naming them."""
import os

import pytest

from eval import kernel_stats as ks
from hybrid.errors import ConfigError, cli


def _have_tools() -> bool:
    try:
        ks.tools()
        return True
    except ConfigError:
        return False


@pytest.mark.skipif(not _have_tools(), reason="this triton has no NVIDIA backend tools (ptxas, nvdisasm)")
def test_the_selective_scan_backward_compiles_and_is_counted(tmp_path, capsys):
    out, sass = str(tmp_path / "ks.md"), str(tmp_path / "k.sass")
    assert cli(ks.main, ["selective_scan_bwd", "--set", "BLOCK_T=2", "BLOCK_D=4", "--warps", "1", "--out", out,
                         "--sass", sass]) == 0
    text = open(out).read()
    row = next(line for line in text.splitlines() if line.startswith("| selective_scan_bwd"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    got = dict(zip(ks.HEADER, cells))
    assert got["tiles"] == "BLOCK_T=2 BLOCK_D=4 BLOCK_N=16" and got["warps"] == "1"
    assert 0 < int(got["registers"]) <= 255 and int(got["SASS instructions"]) > 100
    assert int(got["MUFU"]) > 0 and int(got["RED/ATOM"]) > 0  # exp2 of the decays; dB/dC/dA atomics
    assert int(got["warps per SM (registers)"]) == min(64, 65536 // (int(got["registers"]) * 32))
    assert "MUFU.EX2" in open(sass).read() and os.path.isfile(out)


def test_bad_options_are_named(tmp_path, capsys):
    out = str(tmp_path / "ks.md")
    for argv, words in ((["selective_scan_bwd", "--set", "BLOCK_Q=4"], ["BLOCK_Q", "not a constexpr", "BLOCK_T"]),
                        (["selective_scan_bwd", "--set", "BLOCK_T"], ["BLOCK_T", "NAME=VALUE"]),
                        (["selective_scan_bwd", "--set", "BLOCK_T=four"], ["BLOCK_T=four", "integer"]),
                        (["selective_scan_bwd", "--warps", "3"], ["--warps", "powers of two"])):
        assert cli(ks.main, argv + ["--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and all(w in err for w in words), err
    with pytest.raises(SystemExit):
        ks.main(["no_such_kernel"])
    assert "invalid choice" in capsys.readouterr().err and not os.path.exists(out)
