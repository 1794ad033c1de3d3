"""What each task's values are: codecs, normal conventions, ADE20K palettes, colour maps, ControlNet maps."""
