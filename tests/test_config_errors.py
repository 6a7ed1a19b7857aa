"""Config mistakes end a run before it starts, with one line (issue 28, items 4-6).

A misspelled family argument (``file.py:sparsty=0.95``), a misspelled field
(``--config.sparsity.finall``), a value that does not parse or is out of range:
each is refused before the workdir is made, data read or anything compiled, with
one line naming the field, the value and the fix (``experiments.main``: exit
status 2). Every config file and the sweeps' run configs still validate.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

from experiments.trainer import config_checks
from experiments.studies.gradient_flow import sweep as gradient_flow_sweep
from experiments.studies.gradient_flow import tuning as gradient_flow_tuning
from experiments.trainer import imp
from experiments.data import input_pipeline
from experiments.studies import scsdc
from experiments.trainer import train
from experiments.configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
CONFIG_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{CONFIG_DIR}/*.py")
                      if os.path.basename(p) not in ("__init__.py", "default.py"))
MAIN_JOB = "experiments/configs/granet_lenet300_mnist5k.py"


def load(spec):
  return config_checks.load_config_file(os.path.join(REPO, spec))


def run_config(config):
  """The config a run trains: IMP's rounds run the static method."""
  return imp._round_config(config, None) if config.sparsity.method == "imp" else config


def docstring_arguments(path):
  """The family arguments of the commands in a config file's docstring."""
  with open(os.path.join(REPO, path)) as f:
    text = f.read()
  name = re.escape(os.path.basename(path))
  return sorted(set(re.findall(rf"{name}:([\w.=,]+)", text)))


# ---------------------------------------------------------------------------
# Every config file (and every run of the sweeps) validates: nothing legitimate
# is refused.
# ---------------------------------------------------------------------------


def test_every_config_file_but_the_two_studies_takes_a_family_argument():
  assert len(CONFIG_FILES) == 22  # and default.py, the shared base
  takes = [p for p in CONFIG_FILES if "no argument" not in _error(p, "x=1")]
  assert len(takes) == 20  # the two gradient-flow studies take none


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_config_file_validates_with_its_default_and_documented_arguments(path):
  arguments = docstring_arguments(path)
  for spec in [path, *(f"{path}:{a}" for a in arguments)]:
    config_checks.validate(run_config(load(spec)))
  if "lenet300" in path or "vit" in path or "gpt" in path:
    assert arguments or path.endswith(("granet_lenet300_mnist5k.py",)), path


def test_the_family_method_choices_are_the_trainers_methods():
  assert set(default.METHODS) - {"granet_st"} == set(config_checks.CHOICES[
      "sparsity.method"][1])
  import sparse_jax
  from sparse_jax import _arguments, _distributions, _regrow
  assert config_checks.CHOICES["sparsity.distribution"][1] == _distributions.DISTRIBUTIONS
  assert config_checks.CHOICES["sparsity.growth"][1] == _regrow.GROWTH_MODES
  assert config_checks.CHOICES["sparsity.scope"][1] == _arguments.SCOPES
  assert config_checks.CHOICES["imp.rewind"][1] == imp.REWIND_MODES
  assert sparse_jax.METHODS


@pytest.mark.parametrize("study_file", ["gradient_flow_mnist5k.py",
                                        "gradient_flow_converged_mnist5k.py"])
def test_every_run_of_the_gradient_flow_studies_validates(study_file):
  config = load(f"experiments/configs/{study_file}")
  study = config.study
  finals = gradient_flow_sweep.grid_runs(study)
  runs = gradient_flow_tuning.tuning_runs(study, finals) + finals
  capacities = {}
  for run in runs:
    if run.density not in capacities:
      capacities[run.density] = scsdc.same_capacity(
          study.family, study.width, run.density, depth=study.depth,
          input_shape=(28, 28, 1), num_classes=10)
    config_checks.validate(gradient_flow_sweep.run_config(
        config, run, capacities[run.density], learning_rate=0.1))
  assert len(runs) > 100


# ---------------------------------------------------------------------------
# Item 4: family arguments, one parser for every config file.
# ---------------------------------------------------------------------------


def _error(path, arg):
  with pytest.raises(ValueError) as err:
    load(f"{path}:{arg}")
  message = str(err.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_a_misspelled_or_malformed_family_argument_is_refused_by_every_config(path):
  takes = "This config takes "
  message = _error(path, "sparsty=0.95")
  if "gradient_flow" in path:
    assert message == ("Unknown config argument 'sparsty' in 'sparsty=0.95'. This "
                       "config takes no argument: set fields with --config.FIELD=VALUE.")
    return
  # The same words from every file; only the list of what it takes differs.
  assert message.startswith("Unknown config argument 'sparsty' in 'sparsty=0.95'; did "
                            f"you mean 'sparsity'? {takes}"), message
  assert "sparsity=" in message and "seed=" in message
  assert _error(path, "sparsity").startswith(
      f"Config argument 'sparsity' in 'sparsity' is not name=value. {takes}")
  assert _error(path, "sparsity=0.9,").startswith(
      "Config argument '' in 'sparsity=0.9,' is not name=value.")
  assert _error(path, "sparsity=abc") == ("Config argument sparsity='abc' is not a "
                                          "number: give e.g. sparsity=" +
                                          re.search(r" sparsity=([\d.]+)", message)[1] + ".")
  assert _error(path, "seed=1.5").startswith("Config argument seed='1.5' is not an "
                                             "integer: give e.g. seed=")
  assert _error(path, "seed=1,seed=2") == ("Config argument 'seed' is given twice in "
                                           "'seed=1,seed=2': give it once.")


@pytest.mark.parametrize("path,arg,expected", [
    ("experiments/configs/cifar_vgg19.py", "method=grannet", "did you mean 'granet'?"),
    ("experiments/configs/cifar_vgg19.py", "dataset=cifar", "did you mean 'cifar10'?"),
    ("experiments/configs/imagenet_resnet50.py", "method=rigel", "did you mean 'rigl'?"),
    ("experiments/configs/vit_mnist5k.py", "method=snip",
     "is not one of dense, granet, gmp, rigl, set, static."),
    ("experiments/configs/gpt_bytes.py", "mehtod=gmp", "did you mean 'method'?"),
    ("experiments/configs/imp_lenet300_mnist5k.py", "round=3", "did you mean 'rounds'?"),
    ("experiments/configs/imp_cifar_vgg19.py", "method=gmp", "rounds=6, rewind_step=1000"),
])
def test_family_argument_values_and_names_get_did_you_mean(path, arg, expected):
  assert expected in _error(path, arg)


def test_family_arguments_set_what_they_name():
  config = load(f"{MAIN_JOB}:sparsity=0.95,seed=1")
  assert (config.sparsity.final, config.seed) == (0.95, 1)
  assert load(MAIN_JOB).sparsity.final == 0.98
  config = load("experiments/configs/cifar_resnet50.py:dataset=cifar100,method=granet_st")
  assert (config.dataset, config.sparsity.method, config.sparsity.initial,
          config.sparsity.final, config.seed) == ("cifar100", "granet", 0.5, 0.95, 18)
  config = load("experiments/configs/imp_cifar_vgg19.py:sparsity=0.9,rounds=3,seed=2")
  assert (config.imp.num_rounds, config.imp.rewind_step, config.seed) == (3, 1000, 2)
  assert config.imp.prune_fraction == pytest.approx(1 - 0.1 ** 0.5)
  config = load("experiments/configs/imp_lenet300_mnist5k.py:rounds=5,rewind_step=10")
  assert (config.imp.num_rounds, config.imp.rewind_step, config.sparsity.final) == (5, 10, 0.98)


# ---------------------------------------------------------------------------
# Item 6: careless values, refused by validate (the table of field -> rule).
# ---------------------------------------------------------------------------

CARELESS = [
    ("batch_size", 0, "an integer >= 1"),
    ("batch_size", -128, "an integer >= 1"),
    ("eval_batch_size", 0, "an integer >= 1"),
    ("eval_every_epochs", 0, "an integer >= 1"),
    ("eval_every_epochs", -1, "an integer >= 1"),
    ("seed", -1, r"an integer in \[0, 4294967295\]"),
    ("warmup_epochs", -1.0, "a finite number >= 0"),
    ("label_smoothing", 2.0, r"in \[0, 1\)"),
    ("momentum", 1.5, r"in \[0, 1\)"),
    ("learning_rate", -0.1, "a finite number >= 0"),
    ("learning_rate", float("nan"), "a finite number >= 0"),
    ("learning_rate", float("inf"), "a finite number >= 0"),
    ("num_train_steps", 0, "an integer >= 1"),
    ("keep_checkpoints", 0, "an integer >= 1"),
    ("weight_decay", -5e-4, "a finite number >= 0"),
    ("weight_decay", float("nan"), "a finite number >= 0"),
    ("lr_decay_factor", 0.0, "a finite number > 0"),
    ("lr_decay_factor", float("inf"), "a finite number > 0"),
    ("lr_milestones", (0.5, 1.5), r"a tuple of fractions of training in \[0, 1\]"),
    ("sparsity.regrowth_rate", 1.5, r"in \[0, 1\]"),
    ("sparsity.regrowth_rate", -0.1, r"in \[0, 1\]"),
    ("sparsity.min_regrowth_rate", 2.0, r"in \[0, 1\]"),
    ("sparsity.initial", 1.0, r"in \[0, 1\)"),
    ("sparsity.update_every", 0, "an integer >= 1"),
    ("sparsity.start_epoch", -1.0, "a finite number >= 0"),
    ("sparsity.end_epoch", float("nan"), "a finite number >= 0"),
    ("sparsity.mask_end_epoch", -2.0, "a finite number >= 0"),
    ("sparsity.srste_decay", -1e-4, "a finite number >= 0"),
    ("sparsity.include", "dense_[", "a valid regular expression"),
    ("sparsity.exclude", "(bias", "a valid regular expression"),
    ("steps_per_dispatch", 0, "an integer >= 1"),
    ("log_every_steps", 0, "an integer >= 1"),
    ("checkpoint_every_steps", -1, "an integer >= 1"),
    ("gradient_flow_every_steps", 0, "an integer >= 1"),
    ("halt_after_step", 0, "an integer >= 1"),
    ("num_processes", 0, "an integer >= 1"),
    ("process_id", -1, "an integer >= 0"),
]


def set_field(config, path, value):
  section, _, name = path.rpartition(".")
  setattr(config[section] if section else config, name, value)


@pytest.mark.parametrize("path,value,rule", CARELESS)
def test_a_careless_value_is_one_line_naming_field_value_and_fix(path, value, rule):
  config = load(MAIN_JOB)
  set_field(config, path, value)
  with pytest.raises(ValueError) as err:
    config_checks.validate(config)
  message = str(err.value)
  assert re.match(rf"{re.escape(path)}={re.escape(repr(value))} must be {rule}", message), \
      message
  assert "\n" not in message
  if _base_value(path) is not None:  # the fix: a valid value of the field
    assert message.endswith(f"; e.g. --config.{path}={_base_value(path)!r}."), message


def _base_value(path):
  node = default.get_base_config()
  for part in path.split("."):
    node = node[part]
  return node


def test_num_epochs_0_is_refused_for_dense_too_unless_num_train_steps_is_set():
  config = load("experiments/configs/dense_lenet300_mnist5k.py")
  config.num_epochs = 0
  with pytest.raises(ValueError, match=r"^num_epochs=0 must be a finite number > 0 \(or set "
                     r"num_train_steps\): nothing would be trained; e.g. "
                     r"--config.num_epochs=30.$"):
    config_checks.validate(config)
  config.num_train_steps = 40
  config_checks.validate(config)


@pytest.mark.parametrize("path,value,expected", [
    ("sparsity.method", "grannet", "Unknown sparse method 'grannet' (sparsity.method); "
     "did you mean 'granet'? Use one of: dense, granet,"),
    ("optimizer", "adamm", "Unknown optimizer 'adamm'; did you mean 'adam'? Use one of: sgd, "),
    ("sparsity.growth", "gradients", "Unknown growth mode 'gradients' (sparsity.growth); did "
     "you mean 'gradient'?"),
    ("sparsity.distribution", "ERK", "Unknown distribution 'ERK' (sparsity.distribution). "
     "Use one of: uniform, er, erk."),
    ("dataset", "mnist5", "Unknown dataset 'mnist5'; did you mean 'mnist5k'?"),
    ("if_finished", "extends", "Unknown if_finished 'extends'; did you mean 'extend'?"),
])
def test_an_unknown_name_gets_did_you_mean(path, value, expected):
  config = load(MAIN_JOB)
  set_field(config, path, value)
  with pytest.raises(ValueError) as err:
    config_checks.validate(config)
  assert str(err.value).startswith(expected), str(err.value)


def test_paths_are_checked_before_the_workdir_is_made(tmp_path):
  config = load(MAIN_JOB)
  a_file = tmp_path / "file"
  a_file.write_text("not a directory")
  with pytest.raises(ValueError, match=rf"^--workdir={a_file} is a file, not a directory"):
    config_checks.validate(config, str(a_file))
  with pytest.raises(ValueError, match=rf"^--workdir={a_file}/run/x cannot be made: "
                     rf"{a_file} is a file"):
    config_checks.validate(config, str(a_file / "run" / "x"))
  config_checks.validate(config, str(tmp_path / "new" / "run"))  # made later, by the run
  config.init_from = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match=r"^init_from='.*missing.npz' does not exist: "
                     "give an export directory or .npz file"):
    config_checks.validate(config, str(tmp_path / "run"))
  config.init_from = None
  config.data_dir = str(tmp_path / "no_data")
  with pytest.raises(FileNotFoundError, match=r"^data_dir='.*no_data' does not exist \(data "
                     r"set mnist5k\): give the directory"):
    config_checks.validate(config, str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path)) == ["file"]  # nothing made, no data set built


def _forbid_data(monkeypatch):
  def must_not_run(*args, **kwargs):
    raise AssertionError("the data set was opened before the config was checked")
  monkeypatch.setattr(input_pipeline, "dataset_info", must_not_run)
  monkeypatch.setattr(input_pipeline, "load_arrays", must_not_run)


@pytest.mark.parametrize("spec,path,value", [
    (MAIN_JOB, "eval_batch_size", 0),
    (MAIN_JOB, "keep_checkpoints", 0),
    (MAIN_JOB, "init_from", "/nonexistent/export.npz"),
    ("experiments/configs/imp_lenet300_mnist5k.py", "learning_rate", float("nan")),
    ("experiments/configs/imp_lenet300_mnist5k.py", "imp.rewind_step", -1),
])
def test_train_and_imp_check_before_data_and_workdir(tmp_path, monkeypatch, spec, path, value):
  _forbid_data(monkeypatch)
  config = load(spec)
  set_field(config, path, value)
  workdir = tmp_path / "never"
  run = imp.run_imp if config.sparsity.method == "imp" else train.train_and_evaluate
  with pytest.raises((ValueError, FileNotFoundError), match=rf"^{re.escape(path)}="):
    run(config, str(workdir))
  assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_refused_by_the_trainer(tmp_path, monkeypatch):
  _forbid_data(monkeypatch)
  a_file = tmp_path / "run"
  a_file.write_text("keep me")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    train.train_and_evaluate(load(MAIN_JOB), str(a_file))
  assert a_file.read_text() == "keep me"


# ---------------------------------------------------------------------------
# The command line (items 4-6): exit 2, one line on stderr, nothing started.
# ---------------------------------------------------------------------------


def main_run(*args, workdir):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "experiments.main", *args,
                         f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("args,expected", [
    ([f"--config={MAIN_JOB}:sparsty=0.95"],
     "error: Unknown config argument 'sparsty' in 'sparsty=0.95'; did you mean "
     "'sparsity'? This config takes sparsity=0.98, seed=0 (the defaults shown)."),
    (["--config=experiments/configs/gradient_flow_mnist5k.py:x=1"],
     "error: Unknown config argument 'x' in 'x=1'. This config takes no argument: set "
     "fields with --config.FIELD=VALUE."),
    *[([f"--config={MAIN_JOB}", f"--config.{typo}=0.9"],  # two typos, one suggestion
       f"error: Unknown config field --config.{typo}; did you mean "
       "--config.sparsity.final? (--help with --config=FILE lists the fields.)")
      for typo in ("sparsity.finall", "sparsity_final")],
    ([f"--config={MAIN_JOB}", "--config.batch_size=abc"],
     "error: --config.batch_size=abc is not a valid int (invalid literal for int() with "
     "base 10: 'abc'); e.g. --config.batch_size=128."),
    ([f"--config={MAIN_JOB}", "--config.eval_batch_size=0"],
     "error: eval_batch_size=0 must be an integer >= 1 (the evaluation batch); e.g. "
     "--config.eval_batch_size=500."),
])
def test_main_exits_2_with_one_line_before_anything_starts(tmp_path, args, expected):
  workdir = tmp_path / "never"
  out = main_run(*args, workdir=workdir)
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr == expected + "\n"
  assert out.stdout == ""  # not a log line: no data set opened, no model built
  assert not workdir.exists()


def test_help_lists_the_config_fields_with_their_defaults(tmp_path):
  out = subprocess.run([sys.executable, "-m", "experiments.main",
                        "--config=experiments/configs/vit_mnist5k.py:method=rigl", "--help"],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  config = load("experiments/configs/vit_mnist5k.py:method=rigl")
  for expected in ["  --config.sparsity.method=rigl", "  --config.learning_rate=0.003",
                   "  --config.model_kwargs.width=64", "  --config.data_dir=None (str)",
                   "  --config.lr_milestones=(0.5, 0.75)", "  --workdir: Directory for "
                   "checkpoints, metrics and the summary."]:
    assert expected in lines, expected
  listed = [l for l in lines if l.startswith("  --config.")]
  assert len(listed) == len([p for p in config_checks.field_paths(config)
                             if not hasattr(config_checks._lookup(config, p), "keys")])
