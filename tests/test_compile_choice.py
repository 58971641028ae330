"""src/training/compile_choice.py: torch.compile is kept only when measured faster, and skipped
when a remembered measurement says it cannot pay back in the steps left."""

import json

import torch

from src.training.compile_choice import CompileChoice, cache_file, pays_back, read_measurements

EAGER, COMPILED = torch.nn.Identity(), torch.nn.Identity()


def run(choice: CompileChoice, seconds: list[float]) -> tuple[list[torch.nn.Module], list[str]]:
    """Drive ``choice`` through steps of the given durations: the modules used and lines said."""
    used, said = [], []
    for s in seconds:
        used.append(choice.module())
        note = choice.after_step(s)
        if note:
            said.append(note)
    return used, said


def test_compiled_is_kept_when_faster_and_the_measurement_remembered():
    choice = CompileChoice(EAGER, COMPILED, "machine A", steps_left=lambda s: 1000)
    used, said = run(choice, [5.0, 1.0, 1.1, 21.0, 0.9, 0.8, 0.8])
    assert used == [EAGER] * 3 + [COMPILED] * 4
    assert said == ["torch.compile: compiled in 20 s; 0.80 s/step compiled vs 1.00 eager -> "
                    "training compiled"]
    assert choice.steps_measured == 6 and not choice.probing
    assert read_measurements()["machine A"] == {"eager_s": 1.0, "compiled_s": 0.8, "compile_s": 20.2}
    assert json.loads(cache_file().read_text())["machine A"]["compile_s"] == 20.2


def test_eager_is_kept_when_compiled_is_slower():
    choice = CompileChoice(EAGER, COMPILED, "machine B", steps_left=lambda s: 1000)
    used, said = run(choice, [5.0, 1.0, 1.0, 30.0, 1.2, 1.3, 1.0])
    assert used == [EAGER] * 3 + [COMPILED] * 3 + [EAGER]
    assert said[0].endswith("-> training eager")


def test_one_slow_sample_does_not_decide():
    """A compiled step slowed by a neighbour once made compiling look slower than eager: the
    faster of two samples on each side decides."""
    choice = CompileChoice(EAGER, COMPILED, "machine F", steps_left=lambda s: 1000)
    used, said = run(choice, [5.0, 1.3, 1.33, 21.0, 1.53, 0.81, 0.8])
    assert used[-1] is COMPILED
    assert said == ["torch.compile: compiled in 20 s; 0.81 s/step compiled vs 1.30 eager -> "
                    "training compiled"]


def test_a_remembered_measurement_skips_a_compile_that_cannot_pay_back():
    run(CompileChoice(EAGER, COMPILED, "machine C", steps_left=lambda s: 1000),
        [5, 1.0, 1.0, 21, 0.8, 0.8])
    # 0.2 s saved per step: 100 steps left save 20 s < 20.2 s of compiling -> not compiled.
    short = CompileChoice(EAGER, COMPILED, "machine C", steps_left=lambda s: 100)
    used, said = run(short, [5.0, 1.0, 1.0, 1.0])
    assert used == [EAGER] * 4 and short.steps_measured == 1
    assert said == ["torch.compile skipped: it took 20 s here before and would save 0.20 s x ~100 "
                    "steps left"]
    # Enough steps left: it compiles (and measures again).
    long = CompileChoice(EAGER, COMPILED, "machine C", steps_left=lambda s: 500)
    assert run(long, [5.0, 1.0, 1.0, 21.0, 0.8])[0][3] is COMPILED


def test_a_remembered_slower_compile_is_measured_again():
    """A measurement where compiling lost may have been disturbed: it never vetoes compiling."""
    run(CompileChoice(EAGER, COMPILED, "machine G", steps_left=lambda s: 1000),
        [5, 1.0, 1.0, 21, 1.5, 1.5])
    again = CompileChoice(EAGER, COMPILED, "machine G", steps_left=lambda s: 10)
    used, said = run(again, [5.0, 1.0, 1.0, 21.0, 0.8, 0.8, 0.8])
    assert used[3] is COMPILED and used[-1] is COMPILED
    assert said[0].endswith("-> training compiled")


def test_compiling_off_means_eager_throughout():
    choice = CompileChoice(EAGER, None, "machine D", steps_left=lambda s: 10)
    used, said = run(choice, [1.0] * 5)
    assert used == [EAGER] * 5 and said == [] and choice.steps_measured == 1
    assert "machine D" not in read_measurements()


def test_pays_back():
    assert pays_back(eager_s=1.0, compiled_s=0.8, compile_s=20, steps_left=101)
    assert not pays_back(eager_s=1.0, compiled_s=0.8, compile_s=20, steps_left=99)
    assert not pays_back(eager_s=1.0, compiled_s=1.1, compile_s=0, steps_left=1e9)


def test_an_unreadable_cache_is_only_a_missing_hint():
    cache_file().parent.mkdir(parents=True, exist_ok=True)
    cache_file().write_text("{not json")
    assert read_measurements() == {}
    run(CompileChoice(EAGER, COMPILED, "machine E", steps_left=lambda s: 1000),
        [5, 1.0, 1.0, 21, 0.8, 0.8])
    assert set(read_measurements()) == {"machine E"}  # rewritten whole, atomically


def test_a_real_run_measures_and_says_its_choice(tmp_path, capsys):
    """train() with compile on: eager steps, then torch.compile, a line saying which was kept,
    and the measurement remembered for this machine and shape."""
    from src.training.trainer import train
    from tests.fixtures import make_token_data, tiny_config

    make_token_data(tmp_path / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train(tiny_config(tmp_path / "data", tmp_path / "run", compile=True, max_steps=7,
                                eval_interval=7))
    finally:
        torch.set_num_threads(threads)
    assert res["step"] == 7
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("torch.compile: compiled in"))
    assert line.endswith(("-> training compiled", "-> training eager"))
    key = next(k for k in read_measurements() if "micro-batch 4x64" in k)
    assert key.startswith(f"torch {torch.__version__} | ")
