"""Data stage of MM-LDM: audio <-> mel <-> audio image, vocoders, video I/O, datasets, synthetic data.

Names are imported on first use (mmldm_data.lazy).
"""

from mmldm_data.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "MelConfig": "mmldm_data.audio",
        "DatasetConfig": "mmldm_data.config",
        "ConfigError": "mmldm_data.config",
        "SoundingVideoDataset": "mmldm_data.dataset",
        "read_audio": "mmldm_data.media",
        "read_video": "mmldm_data.media",
        "write_video": "mmldm_data.media",
        "Task": "mmldm_data.tasks",
        "load_vocoder": "mmldm_data.vocoder",
    },
)
