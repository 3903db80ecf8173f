"""The offline scoring job (`rmserve score`): files in, a file of scores out, resumable, on one
machine (`run_job`) or a Ray cluster (`run_ray_job`). See README "Offline scoring"."""
from .job import EXIT_BAD_ROWS, EXIT_OK, EXIT_REFUSED, JobConfig, run_job
from .parts import OutputError, ResumeError
from .shapes import ShapeConfig
from .sources import SourceError


def run_ray_job(config: JobConfig, **ray_settings):
    """The same job through Ray Data; see rmserve/offline/ray_job.py for `ray_settings`."""
    from .ray_job import run_ray_job as run

    return run(config, **ray_settings)


__all__ = ["JobConfig", "ShapeConfig", "run_job", "run_ray_job", "ResumeError", "SourceError", "OutputError",
           "EXIT_OK", "EXIT_BAD_ROWS", "EXIT_REFUSED"]
