"""`lesiontrack serve`: run the Storage SCP (and the delivery retry loop) until Ctrl-C / SIGTERM."""

from __future__ import annotations

import typer

from lesiontrack.context import state


def serve(
    ctx: typer.Context,
    port: int | None = typer.Option(None, help="override dicom.port"),
    upgrade_db: bool = typer.Option(False, "--upgrade-db", help="apply database migrations first"),
) -> None:
    """Receive DICOM from the PACS; completed, routed series are logged (jobs are wired by the job layer)."""
    import logging
    import signal
    import threading

    from config.logging import setup_logging
    from dicom_node.scp import StorageSCP
    from dicom_node.sending import DeliveryService
    from dicom_node.database import SchemaNotCurrent, open_database

    settings = state(ctx).settings()
    try:
        sf = open_database(settings, upgrade_db=upgrade_db)
    except SchemaNotCurrent as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    if port is not None:
        settings.dicom.port = port
    setup_logging(settings.logging.level)
    log = logging.getLogger("lesiontrack.serve")

    def on_series_complete(series_uid: str) -> None:
        log.info("series %s complete and routed for analysis", series_uid)

    scp = StorageSCP(settings, sf, on_series_complete).start()
    sender = DeliveryService(settings, sf)
    sender.start()
    typer.echo(f"LesionTrack SCP {settings.dicom.ae_title} listening on {settings.dicom.bind_address}:{scp.port}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    typer.echo("stopping")
    scp.stop()
    sender.stop()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
