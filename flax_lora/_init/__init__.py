"""`lora.init`: which kernels to adapt, and how each adapter starts.

- `_select`: which kernels (the config's patterns and plain names, ``"all-linear"``, the probe's
  uses, the layers picked on a layered kernel), each leaf's choice with its reason;
- `_selection`: `lora.select`, those choices listed before training;
- `_factors`: one kernel's starting factors (lora, gaussian, random, pissa, olora), one carried
  slice at a time, the rank checks, and DoRA's starting magnitude;
- `_loftq`: LoftQ, the factors and the quantized base of one kernel fitted together;
- `_init_extras`: the extras `lora.init` adds beside the factors (``modules_to_save``, trained
  biases, trainable token rows);
- `_make`: `lora.init` itself, one adapter per chosen kernel.
"""
