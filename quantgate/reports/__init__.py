"""HTML reports of run directories (one run, or a matrix of runs). See quantgate.reports.html."""

from quantgate.reports.html import (
    matrix_images,
    report_images,
    write_matrix_report,
    write_run_report,
)
from quantgate.reports.rundata import ReportError

__all__ = ["ReportError", "matrix_images", "report_images", "write_matrix_report", "write_run_report"]
