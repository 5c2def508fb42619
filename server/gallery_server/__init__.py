"""gallery: the media service devices stream their captures into."""
