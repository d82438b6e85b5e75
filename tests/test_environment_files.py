"""environment.yml makes the same environment as `make setup`: it installs the same files."""

from moe_course import ROOT


def test_environment_yml_uses_the_requirement_files():
    text = (ROOT / "environment.yml").read_text()
    for name in ("base.txt", "cuda13.txt", "lab.txt"):
        assert f"-r requirements/{name}" in text
        assert (ROOT / "requirements" / name).exists()
    assert "conda-forge" in text and "-e ." in text


def test_cuda_requirement_files_differ_only_in_their_cuda_build():
    names = {}
    for major in (12, 13):
        lines = (ROOT / "requirements" / f"cuda{major}.txt").read_text().splitlines()
        names[major] = [line.split(">")[0].split("=")[0] for line in lines if line and not line.startswith("#")]
    assert [n.replace("cuda12x", "cuda13x").replace("-cu12", "") for n in names[12]] == names[13]
