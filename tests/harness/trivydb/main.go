// Command trivydb writes a small Trivy vulnerability DB (db/trivy.db and db/metadata.json)
// from a JSON file of fixture advisories, for podsweep's offline tests.
// It must never download anything: every advisory it writes comes from the input file.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/aquasecurity/trivy-db/pkg/db"
	"github.com/aquasecurity/trivy-db/pkg/metadata"
	"github.com/aquasecurity/trivy-db/pkg/types"
	bolt "go.etcd.io/bbolt"
)

// dataSource names where a bucket's advisories come from, as Trivy reports it.
type dataSource struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	URL  string `json:"url"`
}

// advisory is one package affected by one vulnerability in one bucket.
type advisory struct {
	Bucket             string   `json:"bucket"`
	Package            string   `json:"package"`
	VulnerabilityID    string   `json:"vulnerability_id"`
	FixedVersion       string   `json:"fixed_version"`
	Status             string   `json:"status"`
	VulnerableVersions []string `json:"vulnerable_versions"`
	PatchedVersions    []string `json:"patched_versions"`
	Severity           string   `json:"severity"`
	Title              string   `json:"title"`
	Description        string   `json:"description"`
	References         []string `json:"references"`
	PublishedDate      string   `json:"published_date"`
	Source             string   `json:"source"`
}

type fixture struct {
	DataSources map[string]dataSource `json:"data_sources"`
	Advisories  []advisory            `json:"advisories"`
}

func main() {
	out := flag.String("out", "", "cache directory to write db/trivy.db and db/metadata.json into (required)")
	flag.Parse()
	if *out == "" || flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: trivydb -out CACHE_DIR ADVISORIES.json [MORE.json ...]")
		os.Exit(2)
	}
	if err := run(flag.Args(), *out, time.Now().UTC()); err != nil {
		fmt.Fprintf(os.Stderr, "trivydb: %v\n", err)
		os.Exit(1)
	}
}

// loadAll merges several advisory files; a later file adds advisories, it never replaces one.
func loadAll(paths []string) (fixture, error) {
	merged := fixture{DataSources: map[string]dataSource{}}
	for _, path := range paths {
		f, err := load(path)
		if err != nil {
			return fixture{}, err
		}
		for name, ds := range f.DataSources {
			if old, ok := merged.DataSources[name]; ok && old != ds {
				return fixture{}, fmt.Errorf("%s: data source %q differs from an earlier file; make them identical", path, name)
			}
			merged.DataSources[name] = ds
		}
		merged.Advisories = append(merged.Advisories, f.Advisories...)
	}
	return merged, validate(merged)
}

func load(path string) (fixture, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return fixture{}, fmt.Errorf("read advisories %s: %w", path, err)
	}
	var f fixture
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return fixture{}, fmt.Errorf("decode advisories %s: %w (check the field names against main.go)", path, err)
	}
	return f, nil
}

func validate(f fixture) error {
	if len(f.Advisories) == 0 {
		return errors.New("no advisories: the file must hold at least one")
	}
	for i, a := range f.Advisories {
		where := fmt.Sprintf("advisory %d (%s %s)", i, a.VulnerabilityID, a.Package)
		if a.Bucket == "" || a.Package == "" || a.VulnerabilityID == "" {
			return fmt.Errorf("%s: bucket, package and vulnerability_id are all required", where)
		}
		if _, ok := f.DataSources[a.Bucket]; !ok {
			return fmt.Errorf("%s: bucket %q has no entry in data_sources; add one", where, a.Bucket)
		}
		if _, err := types.NewSeverity(a.Severity); err != nil {
			return fmt.Errorf("%s: severity %q is not one of LOW, MEDIUM, HIGH, CRITICAL, UNKNOWN", where, a.Severity)
		}
		if a.Status != "" && types.NewStatus(a.Status) == types.StatusUnknown {
			return fmt.Errorf("%s: status %q is not a Trivy status (affected, will_not_fix, fix_deferred, ...)", where, a.Status)
		}
	}
	return nil
}

func run(in []string, out string, now time.Time) error {
	f, err := loadAll(in)
	if err != nil {
		return err
	}
	dbDir := filepath.Join(out, "db")
	// A stale DB would keep advisories that the file no longer has.
	if err := os.RemoveAll(dbDir); err != nil {
		return fmt.Errorf("remove old db dir %s: %w", dbDir, err)
	}
	if err := db.Init(dbDir); err != nil {
		return fmt.Errorf("init trivy db in %s: %w", dbDir, err)
	}
	dbc := db.Config{}
	err = dbc.BatchUpdate(func(tx *bolt.Tx) error { return put(dbc, tx, f) })
	if cerr := db.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close trivy db: %w", cerr)
	}
	if err != nil {
		return err
	}
	meta := metadata.Metadata{
		Version:    2,
		NextUpdate: now.AddDate(100, 0, 0),
		UpdatedAt:  now,
	}
	if err := metadata.NewClient(dbDir).Update(meta); err != nil {
		return fmt.Errorf("write metadata.json in %s: %w", dbDir, err)
	}
	return nil
}

func put(dbc db.Config, tx *bolt.Tx, f fixture) error {
	buckets := make([]string, 0, len(f.DataSources))
	for name := range f.DataSources {
		buckets = append(buckets, name)
	}
	sort.Strings(buckets)
	for _, name := range buckets {
		ds := f.DataSources[name]
		src := types.DataSource{ID: types.SourceID(ds.ID), Name: ds.Name, URL: ds.URL}
		if err := dbc.PutDataSource(tx, name, src); err != nil {
			return fmt.Errorf("put data source %q: %w", name, err)
		}
	}
	for _, a := range f.Advisories {
		adv := types.Advisory{
			FixedVersion:       a.FixedVersion,
			VulnerableVersions: a.VulnerableVersions,
			PatchedVersions:    a.PatchedVersions,
		}
		if a.Status != "" {
			adv.Status = types.NewStatus(a.Status)
		}
		if err := dbc.PutAdvisory(tx, []string{a.Bucket, a.Package}, a.VulnerabilityID, &adv); err != nil {
			return fmt.Errorf("put advisory %s for %s in %q: %w", a.VulnerabilityID, a.Package, a.Bucket, err)
		}
		sev, _ := types.NewSeverity(a.Severity) // checked in validate
		vuln := types.Vulnerability{
			Title:          a.Title,
			Description:    a.Description,
			Severity:       sev.String(),
			VendorSeverity: types.VendorSeverity{types.SourceID(f.DataSources[a.Bucket].ID): sev},
			References:     a.References,
		}
		if a.PublishedDate != "" {
			t, err := time.Parse(time.RFC3339, a.PublishedDate)
			if err != nil {
				return fmt.Errorf("advisory %s: published_date %q is not RFC 3339: %w", a.VulnerabilityID, a.PublishedDate, err)
			}
			vuln.PublishedDate = &t
		}
		if err := dbc.PutVulnerability(tx, a.VulnerabilityID, vuln); err != nil {
			return fmt.Errorf("put vulnerability %s: %w", a.VulnerabilityID, err)
		}
	}
	return nil
}
