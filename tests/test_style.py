"""The notebooks' plotting style: one look per method, figures exported only on request, as 150-dpi 16:9 PNGs."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from mars_ref.course import style  # noqa: E402


def test_every_method_has_its_own_look():
    looks = {(m["color"], m["ls"], m["marker"]) for name, m in style.METHODS.items()
             if name not in ("MARS exact",)}  # MARS exact at gamma = 1 is exact STORM: drawn alike on purpose
    assert len(looks) == len(style.METHODS) - 1
    assert style.GREY not in {m["color"] for m in style.METHODS.values()}  # grey is for references only
    assert style.line("SGD", every=5) == dict(color=style.BLUE, ls="-", marker="o", markevery=5, label="SGD")
    assert style.line("SGD")["marker"] is None and style.line("approx STORM")["marker"] == "x"


def test_save_writes_nothing_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("MARS_REF_FIGURES", raising=False)
    fig, ax = style.figure()
    ax.plot([1, 2, 3])
    assert style.save(fig, "nothing") == []
    monkeypatch.setenv("MARS_REF_FIGURES", str(tmp_path / "figures"))
    svg, png = style.save(fig, "01_example")
    assert svg.read_text().startswith("<?xml") and png.read_bytes()[:4] == b"\x89PNG"
    first = svg.read_bytes()
    style.save(fig, "01_example")
    assert svg.read_bytes() == first  # no date in the SVG: the same figure gives the same file
    plt.close(fig)


def test_png_is_150_dpi_and_16_to_9(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    from PIL import Image

    monkeypatch.setenv("MARS_REF_FIGURES", str(tmp_path))
    with matplotlib.rc_context(style.rc()):
        fig, ax = style.figure()
        ax.plot([1, 2])
        _, png = style.save(fig, "x")
        plt.close(fig)
    width, height = Image.open(png).size
    assert (width, height) == (round(style.SLIDE[0] * 150), round(style.SLIDE[1] * 150))


def test_log_limits_hold_the_data():
    low, high = style.log_limits([1e-2, 3.0, float("inf")], [float("nan"), 0.0, 5e1])
    assert low < 1e-2 and 5e1 < high < 1e3
