"""pyro-tvc: Variational Task Vector Composition as a Pyro probabilistic program."""
__version__ = "0.1.0"


def load_prepared(artifacts="artifacts/pyro-tvc-tiny", device: str = "auto"):
    """The artefacts of ``pyro-tvc prepare`` from Python: theta_0's image encoder (``.encoder``), heads
    (``.heads([task, ...])``), task vectors (``.bank([task, ...])``), the accuracy table (``.table``) and task
    data with pre-trained features (``.task_data(task, seed)``).

    Raises:
        FileNotFoundError: ``artifacts`` holds no prepared CLIP.
    """
    from pathlib import Path

    from pyro_tvc.protocols.workspace import open_workspace
    from pyro_tvc.runtime import resolve_device

    return open_workspace(Path(artifacts), resolve_device(device))
