"""Generator stage of MM-LDM: DiT over audio + video perceptual latents, cross-modal guidance, sampling.

    from mmldm_dit import MMLDMPipeline
    pipe = MMLDMPipeline.from_pretrained("outputs/demo/model")
    pipe(task="a2v", audio="song.wav").save("song.mp4")

Names are imported on first use (mmldm_data.lazy).
"""

from mmldm_data.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "MMLDMPipeline": "mmldm_dit.pipeline",
        "PipelineOutput": "mmldm_dit.pipeline",
        "export_model": "mmldm_dit.pipeline",
        "MMDiT": "mmldm_dit.dit",
        "DiTConfig": "mmldm_dit.dit",
        "SampleConfig": "mmldm_dit.generate",
        "generate": "mmldm_dit.generate",
        "load_trained_dit": "mmldm_dit.generate",
        "sample": "mmldm_dit.sampling",
        "sample_long": "mmldm_dit.sampling",
    },
)
