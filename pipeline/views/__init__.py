"""Read models the web and the exports use: patient history, exports, thumbnails."""
