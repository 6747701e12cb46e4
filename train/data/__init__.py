"""Training data: the real public sets in the layouts users have, and synthetic slides.

`catalog.open_image_set(spec)` is the entry point. Loaders: `herlev`, `sipakmed`, `cric`,
`lbc` (fields, and fields as bags of detected cells), `isbi` (nucleus boxes), `yolo_folder`
(YOLO-format detection folders); `synth_fields` renders synthetic training fields. `labels`
holds every label map, `splits` the group-aware k-fold and ratio splits, `types` what the
loaders return, `crops` fixed-field crops and square fitting, `yolo_dataset` writes an
ultralytics dataset folder, `paths` finds the shared data.
"""
