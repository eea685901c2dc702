"""`lora.save` / `lora.load`: adapter checkpoints that never lose data and are read as untrusted
input.

- `_atomic`: the filesystem steps of a save (atomic renames, staging folders locked by their
  live save, removal of dead ones, recovery of a checkpoint a killed publish left aside); PEFT's
  `save_peft` stages a new folder with them too;
- `_meta`: a checkpoint's metadata read as untrusted input (a size bound, one check per field);
- `_orbax`: `lora.save`, `lora.load`, `lora.load_config` through orbax.
"""
