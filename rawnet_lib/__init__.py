"""RawNet2 speaker-verification workbook helpers."""
