"""Options and bad input: every problem reported at once, before TensorFlow loads."""

import subprocess
import sys

import pytest

from tfft.config import ConfigError, TrainConfig, build_parser, config_from_args, parse_config
from tfft.train import main, prepare_run


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def problems_of(argv):
    with pytest.raises(ConfigError) as raised:
        prepare_run(*parse_config(argv))
    return raised.value.problems


def test_help_documents_every_option_with_default():
    help_text = " ".join(build_parser().format_help().split())
    for name in TrainConfig.option_names():
        assert "--" + name.replace("_", "-") in help_text
    assert "--max-length MAX_LENGTH Longest tokenized input" in help_text
    assert "Defaults to 128." in help_text
    assert "--config FILE" in help_text


def test_flag_overrides_yaml(tmp_path):
    config_file = write(tmp_path / "run.yaml", "max_length: 64\nbatch-size: 16\nepochs: 2\n")
    config = config_from_args(["--config", config_file, "--max-length", "32"])
    assert config.max_length == 32
    assert config.batch_size == 16
    assert config.epochs == 2


def test_yaml_unknown_key_and_wrong_type(tmp_path):
    config_file = write(tmp_path / "run.yaml", "max_lenght: 64\nbatch_size: many\n")
    with pytest.raises(ConfigError) as raised:
        config_from_args(["--config", config_file])
    problems = raised.value.problems
    assert len(problems) == 2
    assert "unknown option 'max_lenght'" in problems[0]
    assert "--batch-size: expected an integer, received 'many'" in problems[1]


def test_every_problem_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as raised:
        config_from_args(
            ["--learning-rate", "-1", "--batch-size", "8", "--micro-batch-size", "16", "--warmup", "2.5"]
        )
    text = str(raised.value)
    assert "(3 problems)" in text
    assert "--learning-rate: must be a positive number, received -1.0" in text
    assert "--micro-batch-size: must not exceed --batch-size (8), received 16" in text
    assert "--warmup: a value of 1 or more counts updates and must be whole, received 2.5" in text


def test_unknown_choice_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as raised:
        config_from_args(["--precision", "float64"])
    assert raised.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_missing_data_file(tmp_path):
    problems = problems_of(["--train-data", str(tmp_path / "absent.csv")])
    assert problems == [f"--train-data: file or folder not found: '{tmp_path / 'absent.csv'}'. Check the path."]


def test_unknown_column_lists_columns_found(tmp_path):
    data = write(tmp_path / "train.csv", "review,stars\nnice,1\n")
    problems = problems_of(["--train-data", data, "--text-columns", "body", "--label-column", "stars"])
    assert len(problems) == 1
    assert "--text-columns: column 'body' not found" in problems[0]
    assert "Columns found: 'review', 'stars'" in problems[0]


def test_labels_must_be_integers(tmp_path):
    data = write(tmp_path / "train.csv", "text,label\nnice,positive\nbad,0\nok,1.5\n")
    problems = problems_of(["--train-data", data])
    assert len(problems) == 1
    assert "must hold integer labels" in problems[0]
    assert "row 2: 'positive'" in problems[0]
    assert "row 4: '1.5'" in problems[0]


def test_labels_outside_num_labels(tmp_path):
    data = write(tmp_path / "train.csv", "text,label\nnice,0\nbad,3\n")
    problems = problems_of(["--train-data", data, "--num-labels", "2"])
    assert len(problems) == 1
    assert "has labels [3] outside 0..1 (--num-labels 2)" in problems[0]


def test_empty_data_file(tmp_path):
    data = write(tmp_path / "train.jsonl", "\n")
    problems = problems_of(["--train-data", data])
    assert len(problems) == 1
    assert "contains no examples" in problems[0]


def test_model_folder_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    problems = problems_of(["--model", str(tmp_path)])
    assert len(problems) == 1
    assert "is not a model checkpoint" in problems[0]
    assert "config.json, model.safetensors" in problems[0]
    assert "found: notes.txt" in problems[0]


def test_non_empty_output_dir_is_never_overwritten(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    problems = problems_of(["--output-dir", str(tmp_path)])
    assert len(problems) == 1
    assert "already exists and is not empty" in problems[0]
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_problems_from_options_data_and_model_together(tmp_path):
    problems = problems_of(
        [
            "--model", str(tmp_path / "no_model"),
            "--train-data", str(tmp_path / "no_data.csv"),
            "--epochs", "0",
        ]
    )
    assert len(problems) == 3


def test_glue_folder_reads_train_and_dev(glue_dir):
    plan = prepare_run(config_from_args(["--train-data", str(glue_dir / "MRPC")]))
    assert len(plan.train) == 3667
    assert len(plan.evaluation) == 408
    assert plan.train.text_columns == ["#1 String", "#2 String"]
    assert plan.num_labels == 2


def test_command_reports_before_importing_tensorflow(tmp_path):
    code = (
        "import sys; from tfft.train import main; "
        "status = main(['--batch-size', '0', '--train-data', 'missing.csv']); "
        "print(status, 'tensorflow' in sys.modules)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert completed.stdout.split() == ["2", "False"]
    assert "--batch-size: must be a positive integer, received 0." in completed.stderr
    assert "--train-data: file or folder not found: 'missing.csv'" in completed.stderr


def test_main_returns_2_on_bad_input(tmp_path, capsys):
    assert main(["--train-data", str(tmp_path / "x.csv")]) == 2
    assert "file or folder not found" in capsys.readouterr().err


def test_columns_given_for_demo_or_glue_are_checked(tmp_path):
    problems = problems_of(["--text-columns", "review"])
    assert len(problems) == 2  # demo train.csv and dev.csv
    assert "column 'review' not found" in problems[0]
    assert "Columns found: 'text', 'label'" in problems[0]


def test_glue_folder_takes_user_columns(glue_dir):
    problems = problems_of(["--train-data", str(glue_dir / "MRPC"), "--label-column", "stars"])
    assert "--label-column: column 'stars' not found" in problems[0]


def test_help_has_no_contradictory_default():
    help_text = " ".join(build_parser().format_help().split())
    assert "When absent, 'label'. Defaults to none." not in help_text
    assert "--oom-retry, --no-oom-retry" in help_text


def test_demo_recipe_applies_only_without_training_data():
    demo, _ = parse_config([])
    assert (demo.batch_size, demo.learning_rate, demo.epochs) == (16, 1e-4, 4)
    given, _ = parse_config(["--batch-size", "8"])
    assert (given.batch_size, given.learning_rate) == (8, 1e-4)
    own_data, _ = parse_config(["--train-data", "reviews.csv"])
    assert (own_data.batch_size, own_data.learning_rate, own_data.epochs) == (32, 5e-5, 3)


def test_gradient_checkpointing_needs_dropout_zero():
    problems = problems_of(["--gradient-checkpointing"])
    assert problems == [
        "--gradient-checkpointing: needs --dropout 0, received no --dropout (the model keeps "
        "its own, 0.1 for BERT). A recomputed layer would draw a different dropout mask than "
        "its forward pass."
    ]


def test_max_length_beyond_model_positions(tiny_preset):
    problems = problems_of(["--model", str(tiny_preset), "--max-length", "100"])
    assert problems == [
        f"--max-length: the model in {str(tiny_preset)!r} has 64 positions, received 100. "
        "Pass --max-length 64 or less."
    ]
