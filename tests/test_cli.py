"""The command line: a user's mistake is one message naming the override or key and the fix (exit code 2, no
traceback), a bug keeps its traceback, and --help lists the groups, their options and the docs."""
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from celora import cli, help
from celora.errors import ConfigError
from conftest import CONF_DIR


def _refused(*overrides):
    """The error Hydra raises composing these overrides (before any of celora's code runs)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            compose("config", overrides=list(overrides))
        except Exception as e:  # noqa: BLE001
            return e
    pytest.fail(f"{overrides} composed")


# Overrides Hydra cannot compose: said as typed, with what does not exist and the closest that does
COMPOSE = [
    (["fl.roundz=3"], "fl.roundz=3: the config has no key fl.roundz; did you mean fl.rounds=3?"),
    (["+debug=tiny", "client.batchsize=8"], "did you mean client.batch_size=8?"),
    (["modle=tiny_llama"], "modle=tiny_llama: the config has no key modle; did you mean model=tiny_llama?"),
    (["model=tiny_lama"], "model=tiny_lama: conf/model/ has no option tiny_lama; did you mean model=tiny_llama?"),
    (["+debug=tinyy"], "did you mean +debug=tiny?"),
    (["+fl.rounds=3"], "+fl.rounds=3: fl.rounds exists already; set it without the +: fl.rounds=3"),
    (["model.num_hidden_layers=2"], "to pass a new key to celora.models.text.minilm, add it: +model.num_hidden_layers=2"),
    (["fl.rounds=[1,"], "cannot read the override 'fl.rounds=[1,'"),
]


@pytest.mark.parametrize("overrides,message", COMPOSE, ids=[" ".join(o) for o, _ in COMPOSE])
def test_an_override_hydra_cannot_compose_is_named_with_its_fix(overrides, message):
    said = cli.user_message(_refused(*overrides), overrides)
    assert message in said and "\n" not in said, said


def _run_cli(fails, monkeypatch, capsys, argv=()):
    """cli.main around a stand-in for Hydra's main that writes Hydra's failed-job line, then raises `fails`."""
    def hydra_main():
        sys.stderr.write(f"{cli.JOB_FAILED}['fl.rounds=ten']\n")
        raise fails

    monkeypatch.setattr(sys, "argv", ["celora", *argv])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")  # (recorded, so the test's environment is restored after)
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    cli.main(hydra_main)


def test_a_users_mistake_is_one_message_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    with pytest.raises(SystemExit) as done:
        _run_cli(ConfigError("invalid config (1 problem):\n  - fl.rounds='ten' must be an integer"), monkeypatch,
                 capsys)
    assert done.value.code == 2 and os.environ["HYDRA_FULL_ERROR"] == "1"  # Hydra re-raises; cli prints
    assert capsys.readouterr().err == "celora: invalid config (1 problem):\n  - fl.rounds='ten' must be an integer\n"
    with pytest.raises(SystemExit):  # in a sweep: which job failed
        _run_cli(ConfigError("bad"), monkeypatch, capsys, ["-m"])
    assert capsys.readouterr().err.startswith("celora: the job fl.rounds=ten failed (the sweep's other jobs ran")
    with pytest.raises(ZeroDivisionError):  # a bug: raised as it is, Hydra's line kept
        _run_cli(ZeroDivisionError("a bug"), monkeypatch, capsys)
    assert capsys.readouterr().err == f"{cli.JOB_FAILED}['fl.rounds=ten']\n"


def _celora(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "celora", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("override,fix", [("fl.roundz=3", "did you mean fl.rounds=3?"),
                                          ("model=tiny_lama", "did you mean model=tiny_llama?")])
def test_a_typo_on_the_command_line_prints_one_line(tmp_path, override, fix):
    out = _celora(override, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith(f"celora: {override}: ") and fix in out.stderr
    assert out.stderr.count("\n") == 1 and "HYDRA_FULL_ERROR" not in out.stderr


def test_a_config_error_prints_no_traceback_and_loads_nothing(tmp_path):
    out = _celora("+debug=tiny", "model=tiny_llama", "task=classify", "dataset=rt_instruct", "fl.rounds=ten",
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    err = out.stderr
    assert "celora: invalid config (2 problems):" in err and "fl.rounds='ten' must be an integer" in err
    assert "model=tiny_llama answers in tokens" in err and "task=classify answers in classes" in err
    assert "use task=instruct" in err and f"{tmp_path / 'run' / 'failed.json'} keeps the details" in err
    for noise in ("Traceback", "HYDRA_FULL_ERROR", cli.JOB_FAILED):
        assert noise not in err, err
    assert (tmp_path / "run" / "failed.json").exists() and not (tmp_path / "run" / "partition.json").exists()


def test_help_lists_each_group_its_options_the_main_keys_and_the_docs(tmp_path):
    out = _celora("model=tiny_llama", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    page = out.stdout
    tiny_llama = help.description(CONF_DIR / "model" / "tiny_llama.yaml")
    assert tiny_llama.startswith("A random 2-layer LLaMA") and f"*tiny_llama{' ' * 11}{tiny_llama}" in page
    assert "*instruct" in page and " classify " in page  # the task followed the model
    for line in ("  dataset\n", "  model\n", "  experiment\n", "  +split\n", "  +ablation\n", "  +debug\n",
                 "  fl.rounds=15", "  seed=0", "  client.batch_size=16", "  docs/llm.md", "  README.md"):
        assert line in page, line
    assert "attack" not in page and "hydra/" not in page and "common/" not in page  # a script's, Hydra's, a part
    # the chosen options' commented keys, with this config's values (tiny_llama's, instruct's, sequential's)
    for line in ("  model.quantize=null ", "  model.gradient_checkpointing=false", "  task.max_new_tokens=8 ",
                 "  simulation.accelerator=auto "):
        assert line in page, line
    assert "  task.answers" not in page and "  model.answers" not in page
