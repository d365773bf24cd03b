def run(seed: int, jobs: int) -> dict: return {"ok": False}
