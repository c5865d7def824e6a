"""Run comparison against a real MLflow server: jobs recorded the way the driver records them.

Each job is a parent run with the comparison tags, a train stage run with a per-step history of loss,
tokens/s and MFU (one resumed job has two train runs), and an eval run. `jobs/compare.py` must show
the differing settings, the final loss of the joined history, median throughput and eval results,
write the overlaid loss curves, and log both to a comparison run.
"""

import math
import uuid

import matplotlib.image
import pytest
from mlflow import MlflowClient

from jobs import compare as compare_job
from pipeline import tracking
from pipeline.tracking.compare import JobRecord, format_table, load_jobs, plot_losses


def _record_job(uri, experiment, name, precision, curves, tokens_per_s, val_loss):
    """A parent run and its stage runs; `curves` is one {step: loss} per train run (a resume adds one)."""
    tags = {"precision": precision, "model_name": "llama-tiny", "model_size": "140K", "hardware": "1x NVIDIA H100",
            "data_fingerprint": "f" * 64, "code.commit": "c0ffee"}
    parent = tracking.find_or_start_parent(experiment, name, tags, params={"train.fp8": precision, "train.lr": 1e-4},
                                           tracking_uri=uri)
    client = MlflowClient(uri)
    for curve in curves:
        with tracking.stage_run(parent, "train", tracking_uri=uri) as run_id:
            for step, loss in curve.items():
                tracking.log_metrics(run_id, {"loss": loss, "tokens_per_s": tokens_per_s * (0.2 if step == 1 else 1),
                                              "mfu": 0.4}, step=step, tracking_uri=uri)
    with tracking.stage_run(parent, "eval", tracking_uri=uri) as run_id:
        tracking.log_metrics(run_id, {"finetuned/val_loss": val_loss, "finetuned/perplexity": math.exp(val_loss)},
                             tracking_uri=uri)
    client.set_terminated(parent, "FINISHED")
    return parent


@pytest.fixture(scope="module")
def jobs(mlflow_server):
    uri, experiment = mlflow_server.uri, f"compare-{uuid.uuid4().hex[:6]}"
    fp8_curve = {s: 3.0 / s for s in range(1, 11)}
    bf16_first, bf16_resumed = {s: 3.1 / s for s in range(1, 7)}, {s: 3.2 / s for s in range(5, 11)}
    fp8 = _record_job(uri, experiment, "job-fp8", "fp8-delayed", [fp8_curve], 9000.0, 1.25)
    bf16 = _record_job(uri, experiment, "job-bf16", "bf16", [bf16_first, bf16_resumed], 5000.0, 1.20)
    return {"uri": uri, "experiment": experiment, "fp8": fp8, "bf16": bf16}


def test_records_join_resumed_curves_and_take_median_throughput(jobs):
    by_name = {j.name: j for j in load_jobs(jobs["uri"], experiment=jobs["experiment"])}
    bf16 = by_name["job-bf16"]
    assert [s for s, _ in bf16.curve] == list(range(1, 11))
    assert bf16.curve[5] == (6, pytest.approx(3.2 / 6))  # the resumed run wins on the steps both logged
    assert bf16.metrics["final_loss"] == pytest.approx(3.2 / 10)
    assert by_name["job-fp8"].metrics["tokens_per_s"] == pytest.approx(9000.0)  # step 1's warm-up left out
    assert by_name["job-fp8"].metrics["finetuned/val_loss"] == pytest.approx(1.25)


def test_compare_prints_the_table_and_logs_the_curves(jobs, tmp_path, capsys):
    args = ["--experiment", jobs["experiment"], "--tracking-uri", jobs["uri"], "--out", str(tmp_path)]
    assert compare_job.main([*args, "job-fp8", jobs["bf16"]]) == 0  # a job name and a parent run id
    out = capsys.readouterr().out.splitlines()
    header, rows = out[0].split(), [line.split() for line in out[2:4]]
    assert header[:3] == ["job", "precision", "train.fp8"]  # differing settings only: not model_name, lr
    assert "model_name" not in header and "train.lr" not in header
    assert [r[0] for r in rows] == ["job-bf16", "job-fp8"]  # lowest finetuned/val_loss first
    assert rows[1][header.index("final_loss")] == "0.3"
    assert rows[1][header.index("tokens_per_s")] == "9,000"  # as the progress lines show them
    assert rows[1][header.index("mfu")] == "40.0%"
    png = tmp_path / "loss_curves.png"
    assert matplotlib.image.imread(png).shape[0] > 100
    comparison_id = out[-1].split()[4]  # "logged as MLflow run <id> ..."
    client = MlflowClient(jobs["uri"])
    comparison = client.get_run(comparison_id)
    assert comparison.data.tags["pipeline.role"] == "comparison"
    assert set(comparison.data.tags["comparison.runs"].split(",")) == {jobs["fp8"], jobs["bf16"]}
    assert {a.path for a in client.list_artifacts(comparison_id)} == {"loss_curves.png", "comparison.txt"}


def test_plot_overlays_one_curve_per_job(jobs, tmp_path):
    records = load_jobs(jobs["uri"], experiment=jobs["experiment"])
    fig = plot_losses(records, tmp_path / "curves.png")
    lines = fig.axes[0].get_lines()
    assert sorted(line.get_label() for line in lines) == ["job-bf16 bf16 1x NVIDIA H100",
                                                          "job-fp8 fp8-delayed 1x NVIDIA H100"]
    assert all(list(line.get_xdata()) == list(range(1, 11)) for line in lines)


def test_unknown_run_is_one_line(jobs, capsys):
    assert compare_job.main(["--experiment", jobs["experiment"], "--tracking-uri", jobs["uri"], "nope"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"compare: error: run 'nope' is not a job name in experiment {jobs['experiment']!r} nor a run id")


def test_job_names_are_looked_up_in_the_configs_experiment(jobs, tmp_path, capsys):
    args = ["--tracking-uri", jobs["uri"], "--set", f"tracking.experiment={jobs['experiment']}", "--no-log",
            "--out", str(tmp_path)]
    assert compare_job.main([*args, "job-fp8", "job-bf16"]) == 0  # no --experiment: the config's
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()[2:4]} == {"job-fp8", "job-bf16"}
    other = ["--tracking-uri", jobs["uri"], "--set", "tracking.experiment=not-there", "--no-log", "--out", str(tmp_path)]
    assert compare_job.main([*other, jobs["fp8"]]) == 0  # an experiment that does not exist: ids still work
    assert compare_job.main([*other, "job-fp8"]) == 1
    assert capsys.readouterr().err.strip().endswith(
        "run 'job-fp8' is not a run id; pass --experiment to look jobs up by name")


def test_compare_shows_throughput_as_the_progress_lines_do():
    jobs = [JobRecord("gpu", "a", "0", {}, {}, {"final_loss": 1.23456, "tokens_per_s": 183220.4, "mfu": 0.4131}),
            JobRecord("cpu", "b", "0", {}, {}, {"final_loss": 2.5, "tokens_per_s": 45090.0, "mfu": 0.0})]
    rows = [line.split() for line in format_table(jobs, sort_by="final_loss").splitlines()]
    assert rows[0] == ["job", "final_loss", "tokens_per_s", "mfu"]
    assert rows[2:] == [["gpu", "1.235", "183,220", "41.3%"], ["cpu", "2.5", "45,090", "n/a"]]


def test_a_local_store_that_is_not_there_is_one_line_and_nothing_is_made(tmp_path, capsys):
    missing = tmp_path / "elsewhere" / "mlflow.db"
    assert compare_job.main(["--tracking-uri", f"sqlite:///{missing}", "--experiment", "tiny-demo", "--no-log"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"compare: error: tracking uri 'sqlite:///{missing}': no MLflow store at {missing}")
    assert not (tmp_path / "elsewhere").exists()
