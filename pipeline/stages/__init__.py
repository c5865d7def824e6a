"""The job's stages: data-prep (with its sources), eval and export."""
