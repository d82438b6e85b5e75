"""Every command line of benchmarks/ and tools/ refuses a bad argument in argparse, before anything
else runs (no GPU check, no import of a kernel): exit status 2 and a usage error naming the
argument. A record it cannot read ends it with one line on stderr and status 1, never a traceback.

Most checks run in this process on each script's own parser (a few milliseconds each); a handful
run the scripts for real, as a learner would, in parallel subprocesses."""

import argparse
import os
import shutil
import subprocess
import sys

import pytest
import tools_modules  # setup_env and make_locks, which import each other as scripts do
from benchmark_scripts import load

from moe_course import RESULTS_DIR, ROOT, machine, records
from moe_course.checks import run_command

SCRIPTS = {  # name: folder
    "bench_grouped_gemm": "benchmarks", "bench_io_overlap": "benchmarks", "bench_layer_kernels": "benchmarks",
    "bench_moe_layer": "benchmarks", "bench_moe_variants": "benchmarks", "bench_token_rounding": "benchmarks",
    "ceilings": "benchmarks", "memory_analysis": "benchmarks", "profile_moe_layer": "benchmarks",
    "throughput": "benchmarks", "token_rounding_quality": "benchmarks", "bench_hf_backends": "benchmarks",
    "bench_decode": "benchmarks", "bench_dswiglu_schedules": "benchmarks",
    "book": "tools", "cubin_digest": "tools", "grade": "tools", "make_exercises": "tools", "make_locks": "tools",
    "readme_tables": "tools", "sanitize": "tools", "sanitize_workload": "tools", "setup_env": "tools",
    "update": "tools",
}
MISSING = "/no/such/folder"


def script(name: str):
    """The script ``name`` as a module."""
    if name in ("setup_env", "make_locks"):
        return getattr(tools_modules, name)
    return load(name, SCRIPTS[name])


class _Parser(Exception):
    """Raised in place of parsing: carries the parser a script's main() built."""


def parser_of(name: str) -> argparse.ArgumentParser:
    """The argparse parser ``name``'s main() builds (caught as main() asks it to parse)."""
    module = script(name)

    def caught(parser, *args, **kwargs):
        raise _Parser(parser)

    real, argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_args, caught
    try:
        module.main()
    except _Parser as found:
        return found.args[0]
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError(f"{name}.main() parsed no arguments")


def options(parser: argparse.ArgumentParser):
    """Every argument of ``parser`` and of its sub-commands, as ``(name, action)``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from options(sub)
        else:
            yield (action.option_strings[-1] if action.option_strings else action.dest), action


FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction, argparse._StoreConstAction)
#: Free text on purpose, or checked right after parsing (main() calls parser.error): see FREE below.
FREE = {
    ("throughput", "--implementation"): "words matched against a record's names",
    ("make_locks", "--torch-cpu-wheels"): "a web page or a folder of wheels",
    ("setup_env", "--venv"): "a folder to make", ("setup_env", "--download"): "a folder to fill",
    ("setup_env", "--skip"): "package names the target has",
    ("setup_env", "--python-version"): "checked after parsing (standard library only)",
    ("setup_env", "--wheelhouse"): "checked after parsing (standard library only)",
    ("grade", "exercises"): "checked after parsing, against exercises/",
    ("cubin_digest", "--only"): "checked after parsing, against the builds of --kernels",
}


def test_every_argument_has_a_checked_type_or_choices():
    untyped = []
    for name in SCRIPTS:
        for option, action in options(parser_of(name)):
            if isinstance(action, FLAGS) or (name, option) in FREE:
                continue
            # a bare int or float would take -3 or nan: the types of moe_course/checks.py bound them
            if (action.type is None and action.choices is None) or action.type in (int, float):
                untyped.append(f"{name} {option}")
    assert not untyped, "arguments without a checked type or choices: " + ", ".join(untyped)


BAD = [  # (script, arguments, what the usage error says)
    ("bench_grouped_gemm", ["--impls", "nope"], "argument --impls: invalid choice: 'nope'"),
    ("bench_grouped_gemm", ["--shapes", "nope"], "argument --shapes: invalid choice: 'nope'"),
    ("bench_grouped_gemm", ["--routing", "sideways"], "argument --routing: invalid choice"),
    ("bench_grouped_gemm", ["--proj", "left"], "argument --proj: invalid choice"),
    ("bench_io_overlap", ["--rounds", "-3"], "argument --rounds: must be >= 1, got -3"),
    ("bench_io_overlap", ["--rounds", "five"], "argument --rounds: expected a whole number, got 'five'"),
    ("bench_io_overlap", ["--shapes", "nope"], "argument --shapes: invalid choice: 'nope'"),
    ("bench_io_overlap", ["--parts", "everything"], "argument --parts: invalid choice"),
    ("bench_io_overlap", ["--launch-once", "0"], "argument --launch-once: must be >= 1, got 0"),
    ("bench_layer_kernels", ["--shapes", "nope"], "argument --shapes: unknown MoE configuration 'nope'"),
    ("bench_layer_kernels", ["--shapes"], "argument --shapes: expected at least one argument"),
    ("bench_moe_layer", ["--shapes", "gpt-5"], "argument --shapes: unknown MoE configuration 'gpt-5'"),
    ("bench_moe_layer", ["--contenders", "cutlass"], "argument --contenders: invalid choice: 'cutlass'"),
    ("bench_moe_layer", ["--record", "../x"], "argument --record: a record kind is made of letters"),
    ("bench_moe_variants", ["--reps", "0"], "argument --reps: must be >= 1, got 0"),
    ("bench_moe_variants", ["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    ("bench_moe_variants", ["--configs", "nope"], "argument --configs: unknown MoE configuration 'nope'"),
    ("bench_token_rounding", ["--tile", "0"], "argument --tile: must be >= 1, got 0"),
    ("bench_token_rounding", ["--impls", "nope"], "argument --impls: invalid choice: 'nope'"),
    ("bench_token_rounding", ["--skew", "-0.5"], "argument --skew: must be >= 0, got -0.5"),
    ("bench_token_rounding", ["--methods", "padded"], "argument --methods: invalid choice: 'padded'"),
    ("bench_token_rounding", ["--shapes", "nope"], "argument --shapes: invalid choice: 'nope'"),
    ("ceilings", ["--n", "-1"], "argument --n: must be >= 1, got -1"),
    ("ceilings", ["--copy-gib", "0"], "argument --copy-gib: must be > 0, got 0"),
    ("ceilings", ["--copy-gib", "inf"], "argument --copy-gib: expected a finite number, got 'inf'"),
    ("memory_analysis", ["--config", "nope"], "argument --config: unknown MoE configuration 'nope'"),
    ("memory_analysis", ["--tokens", "0"], "argument --tokens: must be >= 1, got 0"),
    ("profile_moe_layer", ["--iters", "-1"], "argument --iters: must be >= 1, got -1"),
    ("profile_moe_layer", ["--shapes", "nope"], "argument --shapes: unknown MoE configuration 'nope'"),
    ("profile_moe_layer", ["--contenders", "nope"], "argument --contenders: invalid choice: 'nope'"),
    ("throughput", ["--num-gpus", "0"], "argument --num-gpus: must be >= 1, got 0"),
    ("throughput", ["--mfu", "1.5"], "argument --mfu: must be > 0 and <= 1, got 1.5"),
    ("throughput", ["--mfu", "nan"], "argument --mfu: expected a finite number, got 'nan'"),
    ("throughput", ["--price-per-gpu-hour", "-2"], "argument --price-per-gpu-hour: must be > 0, got -2"),
    ("throughput", ["--peak-tflops", "0"], "argument --peak-tflops: must be > 0, got 0"),
    ("throughput", ["--seq-len", "-1"], "argument --seq-len: must be >= 0, got -1"),
    ("throughput", ["--hardware", "tpu"], "argument --hardware: unknown hardware 'tpu'"),
    ("throughput", ["--config", "gpt-5"], "argument --config: unknown MoE configuration 'gpt-5'"),
    ("throughput", ["--mfu-from-record", "../ceilings"], "argument --mfu-from-record: a record kind is made of"),
    ("throughput", ["--results-dir", MISSING], f"argument --results-dir: no folder '{MISSING}'"),
    ("token_rounding_quality", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ("token_rounding_quality", ["--tile", "-1"], "argument --tile: must be >= 1, got -1"),
    ("token_rounding_quality", ["--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
    ("token_rounding_quality", ["--methods", "padded"], "argument --methods: invalid choice: 'padded'"),
    ("book", ["execute", "11"], "argument chapters: no chapter '11'"),
    ("book", ["publish"], "argument command: invalid choice: 'publish'"),
    ("cubin_digest", ["--kernels", MISSING], f"argument --kernels: no folder '{MISSING}'"),
    ("make_locks", ["--variants", "rocm"], "argument --variants: invalid choice: 'rocm'"),
    ("readme_tables", ["--results", MISSING], f"argument --results: no folder '{MISSING}'"),
    ("readme_tables", ["--readme", MISSING], f"argument --readme: no file '{MISSING}'"),
    ("sanitize", ["--timeout", "0"], "argument --timeout: must be > 0, got 0"),
    ("sanitize", ["--tools", "valgrind"], "argument --tools: invalid choice: 'valgrind'"),
    ("setup_env", ["--target", "windows"], "argument --target: invalid choice: 'windows'"),
    ("setup_env", ["--variant", "rocm"], "argument --variant: invalid choice: 'rocm'"),
]


@pytest.mark.parametrize("name,argv,message", BAD, ids=[f"{n} {' '.join(a)}" for n, a, _ in BAD])
def test_a_bad_argument_is_a_usage_error_naming_it(name, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser_of(name).parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and message in err, err


def test_checks_made_after_parsing_are_usage_errors_too(monkeypatch, capsys):
    """The few arguments checked in main() against what they name (parser.error: exit 2, nothing run)."""
    setup_env = script("setup_env")
    monkeypatch.setattr(setup_env, "install", lambda args: pytest.fail("installed despite a bad argument"))
    monkeypatch.setattr(setup_env, "download", lambda args: pytest.fail("downloaded despite a bad argument"))
    cases = [
        (script("cubin_digest"), ["--only", "99_nothing.cu"], "argument --only: no build named 99_nothing.cu"),
        (setup_env, ["--python-version", "three"], "argument --python-version: expected a version such as 3.12"),
        (setup_env, ["--wheelhouse", MISSING], f"argument --wheelhouse: no folder '{MISSING}'"),
        (script("update"), ["--repo", MISSING], f"argument --repo: no folder '{MISSING}'"),
        (script("grade"), ["99"], "argument EX: no exercise matches '99'"),
    ]
    for module, argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            module.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err, (argv, err)


# ----------------------------------------------------------------------------------------------
# A record a command line cannot read: one line, exit status 1


def test_run_command_prints_a_record_error_as_one_line(capsys):
    def main():
        raise records.RecordError("benchmarks/results/x__gpu.json: data.rows[2] has no key 'ms' (keys: shape)")

    assert run_command(main) == 1
    err = capsys.readouterr().err
    assert err.endswith(": error: benchmarks/results/x__gpu.json: data.rows[2] has no key 'ms' (keys: shape)\n")
    assert err.count("\n") == 1


@pytest.fixture
def cut_short(tmp_path):
    """A copy of the committed records, ``kind``'s cut in half (as a run killed while writing)."""
    def make(kind: str):
        folder = tmp_path / "results"
        shutil.copytree(RESULTS_DIR, folder, dirs_exist_ok=True)
        path = next(folder.glob(f"{kind}__*.json"))
        path.write_text(path.read_text()[: path.stat().st_size // 2])
        return folder, path
    return make


RECORD_READERS = [  # (script, the record it shows without a GPU, its arguments; RESULTS: the folder)
    ("bench_grouped_gemm", "grouped_gemm", []),
    ("bench_io_overlap", "io_overlap", []),
    ("bench_layer_kernels", "layer_kernels", []),
    ("bench_moe_layer", "moe_layer_training", []),
    ("bench_moe_variants", "moe_variants", ["--results-dir", "RESULTS"]),
    ("bench_token_rounding", "token_rounding_speed", []),
    ("ceilings", "ceilings", []),
    ("memory_analysis", "memory_analysis", ["--config", "7b"]),
    ("throughput", "grouped_gemm", ["--mfu-from-record", "grouped_gemm", "--results-dir", "RESULTS"]),
    ("readme_tables", "io_overlap", ["--check", "--results", "RESULTS"]),
]


@pytest.mark.skipif(machine.has_gpu(), reason="without a GPU the scripts show the records (with one they measure)")
@pytest.mark.parametrize("name,kind,argv", RECORD_READERS, ids=[r[0] for r in RECORD_READERS])
def test_a_broken_record_ends_a_command_line_in_one_line(name, kind, argv, cut_short, monkeypatch, capsys):
    folder, path = cut_short(kind)
    monkeypatch.setattr(records, "RESULTS_DIR", folder)
    main = script(name).main
    assert run_command(lambda: main([str(folder) if a == "RESULTS" else a for a in argv])) == 1
    err = capsys.readouterr().err  # (ceilings.py says first which machine this is)
    assert f"{path}: is cut short" in err.strip().splitlines()[-1] and "Traceback" not in err, err


# ----------------------------------------------------------------------------------------------
# For real: the scripts as a learner runs them, without a GPU (in parallel: ~2 s of imports each,
# so a few; the parsers of every script are checked above)

REAL = [  # three of the arguments that once went unchecked, or ended in a traceback
    (["benchmarks/bench_grouped_gemm.py", "--impls", "nope"], "argument --impls: invalid choice: 'nope'"),
    (["benchmarks/ceilings.py", "--n", "-1"], "argument --n: must be >= 1, got -1"),
    (["benchmarks/token_rounding_quality.py", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
]


def test_the_scripts_themselves_refuse_bad_arguments_and_broken_records(tmp_path):
    root = tmp_path / "course"  # MOE_COURSE_ROOT: a course whose one record is cut short
    (root / "benchmarks" / "results").mkdir(parents=True)
    record = root / "benchmarks" / "results" / "grouped_gemm__nvidia-h200.json"
    record.write_text(next(RESULTS_DIR.glob("grouped_gemm__*.json")).read_text()[:5000])
    env = {**os.environ, "MOE_COURSE_FORCE_CPU": "1"}  # the no-GPU path on any machine
    runs = [(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE), 2, message) for argv, message in REAL]
    runs.append((subprocess.Popen([sys.executable, "benchmarks/bench_grouped_gemm.py"], cwd=ROOT,
                                  env={**env, "MOE_COURSE_ROOT": str(root)}, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE), 1,
                 "bench_grouped_gemm.py: error: benchmarks/results/grouped_gemm__nvidia-h200.json: is cut short"))
    for process, code, message in runs:
        _, err = process.communicate(timeout=120)
        assert process.returncode == code and message in err and "Traceback" not in err, (process.args, err)
