"""Readers: files of one format -> (uint8 image CHW, int64 mask HW), letterboxed to the training geometry."""
