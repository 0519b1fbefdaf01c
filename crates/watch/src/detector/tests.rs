//! The detector on synthetic series (written next).
