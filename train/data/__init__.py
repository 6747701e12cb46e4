"""Training data for papscan's default models: synthetic slides and the real public sets.

Each module has one job: `paths` finds the shared data folder, `isbi` and `herlev` read
the real sets, `synth_rois` samples synthetic detector ROIs, `crops` cuts fixed-field cell
crops, `yolo_dataset` writes an ultralytics dataset folder.
"""
