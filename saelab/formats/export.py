"""`export`: a dictionary in any format saelab reads, written in one it writes (`saelab export`).

Its settings are one ExportConfig, each field documented once (`saelab export --help` shows the
same text)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saelab.checks import check_field_types, check_number, doc_field
from saelab.errors import SaelabError
from saelab.formats import load_one
from saelab.formats.saelens import export_saelens
from saelab.formats.sparsify import export_sparsify
from saelab.sae import SAE
from saelab.storage.files import check_output_dir

FORMATS = ("saelens", "sparsify", "saelab")


@dataclass(frozen=True)
class ExportConfig:
    """The format to write, its metadata, and whether a non-empty directory may be written to."""

    format: str = doc_field("saelens", "saelens (cfg.json + sae_weights.safetensors), sparsify "
                            "(cfg.json + sae.safetensors, TopK only) or saelab.")
    context_size: int | None = doc_field(None, "SAELens metadata: context size the SAE was "
                                         "trained with.", "not recorded")
    overwrite: bool = doc_field(False, "Allow writing into a non-empty directory.")

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.format not in FORMATS:
            raise SaelabError(f"unknown export format {self.format!r}; use saelens, sparsify or saelab")
        check_number("context_size", self.context_size, 1)


def export(dictionary: str | Path, out: str | Path, config: ExportConfig | None = None) -> SAE:
    """Write `dictionary` (a saelab, SAELens or sparsify directory, or hf:OWNER/NAME[/FOLDER];
    one dictionary, not a run directory) into `out` as `config.format`; returns it as loaded.
    `out` is checked before the dictionary is read."""
    cfg = config or ExportConfig()
    out = check_output_dir(Path(out), cfg.overwrite)
    sae = load_one(dictionary)
    if cfg.format == "saelens":
        export_saelens(sae, out, context_size=cfg.context_size, overwrite=cfg.overwrite)
    elif cfg.format == "sparsify":
        export_sparsify(sae, out, overwrite=cfg.overwrite)
    else:
        sae.save(check_output_dir(out, cfg.overwrite))  # again: loading may have taken a while
    return sae
