"""The command blocks of the README and of the own-data, search and casework docs, run in
sequence as written, on synthetic hands in a fresh working folder: the paths the docs leave
to the user (/data/...) point at synthetic images, and every command with a config gets
`--set model=tiny` and a short run (one epoch, one split). A command that fails as written
fails here."""
import runpy
import shlex
import shutil
import sys

import pytest

from conftest import ROOT, run_script

pytestmark = pytest.mark.slow  # end to end (make test-slow)
# (page, heading) of each block, in the order a user runs them.
SECTIONS = [("README.md", "Train, evaluate, tabulate"),
            ("README.md", "Try it without weights"),
            ("docs/data.md", "Your own data"),
            ("docs/data.md", "Features, search and ONNX export"),
            ("docs/data.md", "A large or growing gallery"),
            ("docs/casework.md", "Likelihood ratios for casework")]
SHORT_RUN = ["model=tiny", "epochs=1", "prompt_epochs=1", "num_splits=1", "num_workers=0"]
# run_all's default is every eval config: here one fine-tuned and one baseline config.
RUN_ALL_CONFIGS = ["--configs", "configs/finetuning_stage1_frozen_text/eval_vitb16_11k_dorsal_r.yml",
                   "configs/baseline/eval_vitb16_11k_dorsal_r.yml"]


def section_commands(page, heading):
    """The command lines of the bash blocks under `heading` (to the next heading)."""
    lines, inside, fence = [], False, None
    for line in (ROOT / page).read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence else line[3:]
            continue
        if fence is None and line.startswith("#"):
            inside = line.lstrip("#").strip() == heading
        elif inside and fence == "bash" and line.split("#")[0].strip():
            lines.append(line.split("#")[0].strip())
    return lines


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """The user's raw data as the docs name it: a raw 11k download (40 persons, as the
    demo's, so a Stage-2 pk batch of 16 identities fits), one folder per person of their own
    hands and of reference hands, and casework photos."""
    work = tmp_path_factory.mktemp("user")
    raw = work / "raw_11k"
    run_script("datasets/make_synthetic_hands.py", "--out", raw, "--seed", "0", "--subjects",
               "40", "--images-per-aspect", "4", "--width", "160", "--height", "120")
    images = sorted((raw / "Hands").glob("*.jpg"))
    folders = {"my_hands": images[: len(images) // 2], "reference_hands": images[len(images) // 2:]}
    for name, files in folders.items():
        for index, image in enumerate(files):  # 8 persons' worth of images a folder
            person = work / name / f"person{index % 20:02d}"
            person.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, person)
    (work / "casework/gallery").mkdir(parents=True)
    for image in images[:6]:
        shutil.copy(image, work / "casework/gallery")
    for name, image in (("questioned.jpg", images[0]), ("reference.jpg", images[1]),
                        ("query.jpg", images[2])):
        shutil.copy(image, work / "casework" / name)
    return work


def as_run_here(line, data):
    """The documented command with the user's paths filled in and a short tiny-model run."""
    words = shlex.split(line.replace("/data/", f"{data}/"))
    assert words[0] == "python", line
    if words[1] == "run_all_finetuned_stage1.py":
        words += RUN_ALL_CONFIGS
    if "--config" in words or words[1] == "run_all_finetuned_stage1.py":
        words += [arg for value in SHORT_RUN for arg in ("--set", value)]
    return words[1:]


def run_as_main(words, monkeypatch, capsys):
    """`python <script> <args>` in this process (torch is imported once) -> its output."""
    script = ROOT / words[0]
    monkeypatch.setattr(sys, "argv", [str(script), *words[1:]])
    monkeypatch.syspath_prepend(str(script.parent))
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    out, err = capsys.readouterr()
    assert exited.value.code in (0, None), f"{' '.join(words)}\n{err[-3000:]}"
    return out


def test_the_documented_commands_run_as_written(user_data, tmp_path, monkeypatch, capsys):
    # A fresh checkout's working folder: the configs, and the raw 11k download where the
    # README's prepare command looks.
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    shutil.copytree(user_data / "raw_11k", tmp_path / "datasets/11khands")
    (tmp_path / "datasets/synthetic_11k").symlink_to(tmp_path / "datasets/11khands")
    monkeypatch.chdir(tmp_path)
    outputs = {}
    for page, heading in SECTIONS:
        commands = section_commands(page, heading)
        assert commands, (page, heading)
        for line in commands:
            outputs[line] = run_as_main(as_run_here(line, user_data), monkeypatch, capsys)
    assert len(outputs) >= 17
    compared = next(out for line, out in outputs.items() if "compare_photos.py" in line)
    assert "EER threshold unavailable" not in compared and "EER threshold " in compared
    assert "likelihood ratio (same person vs different persons)" in compared
    summary = (tmp_path / "logs/results/summary.md").read_text()
    assert "| stage1 | tiny |" in summary and "| baseline | tiny |" in summary
