-- save_fixtures: after a recording run, write what was recorded
\copy (SELECT * FROM fw_tier.fixtures_export) TO 'fixtures.tsv'
