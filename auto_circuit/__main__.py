from auto_circuit.app.cli import app

app()
