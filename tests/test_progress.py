"""Progress: a redrawn tqdm bar on a terminal, whole periodic lines in a log."""
import io

from caffe_compat.progress import progress


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
