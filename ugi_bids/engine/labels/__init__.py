"""Label maps: multi-atlas label fusion and label tables/volumes, on numpy/torch volumes."""
