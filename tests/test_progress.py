"""Progress: a redrawn tqdm bar on a terminal, whole periodic lines in a log."""
import io

from caffe_compat.tools.progress import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_a_redrawn_bar():
    stream = Terminal()
    with progress(total=3, desc="extract", unit="img", stream=stream) as bar:
        for _ in range(3):
            bar.update()
    assert "\r" in stream.getvalue() and "3/3" in stream.getvalue()


def test_log_gets_whole_lines_at_most_every_interval_and_at_the_end():
    stream = io.StringIO()
    for _ in progress(range(1000), desc="prepare cub", unit="img", stream=stream, log_every=3600):
        pass
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    # The first line when it starts, then nothing within the hour, then the final count.
    assert len(lines) == 2 and lines[0].startswith("prepare cub: 0/1000 (0%)")
    assert lines[-1].startswith("prepare cub: 1000/1000 (100%)") and "left" in lines[-1]


def test_training_time_left_follows_the_whole_runs_rate(monkeypatch):
    """A display window holding a test pass (slow) or only fast iterations must not swing
    the estimate: time left is the remaining iterations at the run's rate so far."""
    from caffe_compat.solver import progress as train_progress

    clock = [0.0]
    monkeypatch.setattr(train_progress.time, "perf_counter", lambda: clock[0])
    stream = io.StringIO()
    bar = train_progress.TrainProgress(stream, 0, 100, None, display=10)
    # 10 s per iteration, except one window of 10 iterations that took 200 s (a test pass).
    for it in range(40):
        clock[0] += 200 / 10 if 10 <= it < 20 else 10
        bar.iteration(it, 1.0, 1.0, 0.01)
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["0", "10", "20", "30"]
    # After iteration 30: 31 iterations in 410 s, 69 left at that rate.
    assert lines[-1].endswith(f"{train_progress.tqdm.format_interval(69 * 410 / 31)} left")
    assert "mean of the last" not in lines[-1]  # average_loss 1: the loss is its own mean


def test_training_lines_show_the_smoothed_loss_only_when_it_averages(monkeypatch):
    from caffe_compat.solver.progress import TrainProgress

    stream = io.StringIO()
    TrainProgress(stream, 0, 10, None, display=1, average_loss=20).iteration(0, 2.0, 1.5, 0.01)
    assert "loss 2 (mean of the last 20: 1.5) lr 0.01" in stream.getvalue()
