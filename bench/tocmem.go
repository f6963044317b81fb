// Command tocmem measures the memory the reference's estargz reader (Debian's
// github.com/containerd/stargz-snapshotter/estargz, 0.12) keeps for one layer's TOC: what
// stargz-snapshotter holds per mounted layer after estargz.Open and VerifyTOC.
//
// Usage: tocmem BLOB TOCDIGEST
//
// It prints one JSON object: retained (live heap bytes after a GC, reader and verifier kept alive),
// allocated (bytes allocated while parsing), entries (tree entries reachable from the root, the root
// included), nameBytes (the bytes of their names: full paths, as TOCEntry.Name holds them), seconds,
// and the growth of the process's RSS: rssGrowth (after parsing, reader alive) and peakGrowth (VmHWM,
// reset before parsing), both in bytes.
//
// Build: GOPATH=/usr/share/gocode GO111MODULE=off go build -o tocmem tocmem.go
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: tocmem BLOB TOCDIGEST")
		os.Exit(2)
	}
	if err := run(os.Args[1], digest.Digest(os.Args[2])); err != nil {
		fmt.Fprintln(os.Stderr, "tocmem:", err)
		os.Exit(1)
	}
}

func run(blob string, tocDigest digest.Digest) error {
	f, err := os.Open(blob)
	if err != nil {
		return err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return err
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	rssBefore := procStatus("VmRSS:")
	// Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
		return err
	}
	start := time.Now()
	r, err := estargz.Open(io.NewSectionReader(f, 0, info.Size()))
	if err != nil {
		return err
	}
	verifier, err := r.VerifyTOC(tocDigest)
	if err != nil {
		return err
	}
	seconds := time.Since(start).Seconds()
	runtime.GC()
	runtime.ReadMemStats(&after)
	root, ok := r.Lookup("")
	if !ok {
		return fmt.Errorf("no root entry")
	}
	entries, nameBytes := count(root)
	rss, hwm := procStatus("VmRSS:"), procStatus("VmHWM:")
	runtime.KeepAlive(r)
	runtime.KeepAlive(verifier)
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"retained":   after.HeapAlloc - before.HeapAlloc,
		"allocated":  after.TotalAlloc - before.TotalAlloc,
		"entries":    entries,
		"nameBytes":  nameBytes,
		"seconds":    seconds,
		"rssGrowth":  (rss - rssBefore) * 1024,
		"peakGrowth": (hwm - rssBefore) * 1024,
	})
}

// count walks the tree below dir: entries (dir included) and the bytes of their names. A hardlinked
// file appears once per name but is one entry.
func count(dir *estargz.TOCEntry) (entries int, nameBytes int) {
	seen := map[*estargz.TOCEntry]bool{}
	var walk func(e *estargz.TOCEntry)
	walk = func(e *estargz.TOCEntry) {
		if seen[e] {
			return
		}
		seen[e] = true
		entries++
		nameBytes += len(e.Name)
		e.ForeachChild(func(_ string, child *estargz.TOCEntry) bool {
			walk(child)
			return true
		})
	}
	walk(dir)
	return entries, nameBytes
}

// procStatus reads one KiB figure (e.g. "VmRSS:") from /proc/self/status; 0 when absent.
func procStatus(key string) int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, key) {
			fields := strings.Fields(line[len(key):])
			if len(fields) > 0 {
				if n, err := strconv.ParseInt(fields[0], 10, 64); err == nil {
					return n
				}
			}
		}
	}
	return 0
}
