from vggft.cli import run

run()
