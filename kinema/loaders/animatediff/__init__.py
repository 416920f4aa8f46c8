"""AnimateDiff's formats: motion modules (original v1/v2/v3 files, diffusers MotionAdapter folders, kinema files) and
motion LoRAs, read, checked, loaded into a `VideoUNet` and written in each layout."""
