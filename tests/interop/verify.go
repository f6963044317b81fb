// Command estargz-verify checks an eStargz (or zstd:chunked) blob with the reference implementation's
// own library (Debian's github.com/containerd/stargz-snapshotter/estargz, 0.12) and dumps the tree it
// sees, so that lazymount's tests can compare their output against the reference reader.
//
// Usage: estargz-verify [--zstd] BLOB TOCDIGEST
//
// It opens BLOB, verifies the TOC against TOCDIGEST (exit 1 with the error on stderr on mismatch),
// then walks the directory tree the library builds from the TOC (implied directories included,
// hardlinks resolved to their source entry) and prints one JSON object per path to stdout, sorted by
// name. Regular files are read fully through the reader; every chunk is checked against its
// chunkDigest with the verifier VerifyTOC returned, and the whole file against its digest.
//
// Build: GOPATH=/usr/share/gocode GO111MODULE=off go build -o estargz-verify verify.go
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"sort"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	digest "github.com/opencontainers/go-digest"
)

// record is one output line. Xattr values are []byte, so encoding/json writes them base64-encoded.
type record struct {
	Name     string            `json:"name"`
	Type     string            `json:"type"`
	Source   string            `json:"source,omitempty"` // TOC name of the entry a hardlink resolves to
	Size     int64             `json:"size"`
	Mode     int64             `json:"mode"`
	UID      int               `json:"uid"`
	GID      int               `json:"gid"`
	ModTime  int64             `json:"mtime"`
	LinkName string            `json:"linkName,omitempty"`
	DevMajor int               `json:"devMajor,omitempty"`
	DevMinor int               `json:"devMinor,omitempty"`
	NumLink  int               `json:"numLink"`
	Xattrs   map[string][]byte `json:"xattrs,omitempty"`
	Digest   string            `json:"digest,omitempty"`
	Chunks   int               `json:"chunks,omitempty"`
	SHA256   string            `json:"sha256,omitempty"`
}

func main() {
	useZstd := flag.Bool("zstd", false, "open the blob as zstd:chunked")
	flag.Parse()
	if flag.NArg() != 2 {
		fmt.Fprintln(os.Stderr, "usage: estargz-verify [--zstd] BLOB TOCDIGEST")
		os.Exit(2)
	}
	if err := run(flag.Arg(0), flag.Arg(1), *useZstd); err != nil {
		fmt.Fprintln(os.Stderr, "estargz-verify:", err)
		os.Exit(1)
	}
}

func run(blobPath, tocDigest string, useZstd bool) error {
	want, err := digest.Parse(tocDigest)
	if err != nil {
		return fmt.Errorf("bad TOC digest %q: %w", tocDigest, err)
	}
	f, err := os.Open(blobPath)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	var opts []estargz.OpenOption
	if useZstd {
		opts = append(opts, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	}
	r, err := estargz.Open(io.NewSectionReader(f, 0, st.Size()), opts...)
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	v, err := r.VerifyTOC(want)
	if err != nil {
		return fmt.Errorf("verify TOC: %w", err)
	}
	root, ok := r.Lookup("")
	if !ok {
		return fmt.Errorf("no root directory")
	}
	var records []record
	if err := walk(r, v, "", root, &records); err != nil {
		return err
	}
	sort.Slice(records, func(i, j int) bool { return records[i].Name < records[j].Name })
	enc := json.NewEncoder(os.Stdout)
	for _, rec := range records {
		if err := enc.Encode(rec); err != nil {
			return err
		}
	}
	return nil
}

func walk(r *estargz.Reader, v estargz.TOCEntryVerifier, dir string, d *estargz.TOCEntry, out *[]record) error {
	var err error
	d.ForeachChild(func(base string, e *estargz.TOCEntry) bool {
		name := path.Join(dir, base)
		rec := record{
			Name: name, Type: e.Type, Size: e.Size, Mode: e.Mode, UID: e.UID, GID: e.GID,
			ModTime: e.ModTime().Unix(), LinkName: e.LinkName, DevMajor: e.DevMajor,
			DevMinor: e.DevMinor, NumLink: e.NumLink, Xattrs: e.Xattrs, Digest: e.Digest,
		}
		if e.ModTime().IsZero() {
			rec.ModTime = 0
		}
		if e.Name != name {
			rec.Source = e.Name
		}
		switch e.Type {
		case "reg":
			rec.SHA256, rec.Chunks, err = readVerified(r, v, name, e)
		case "dir":
			err = walk(r, v, name, e, out)
		}
		if err != nil {
			return false
		}
		*out = append(*out, rec)
		return true
	})
	return err
}

// readVerified reads a regular file chunk by chunk, checking each chunk against the TOC's chunkDigest
// and the whole file against its digest; it returns the hex sha256 of the content and the chunk count.
func readVerified(r *estargz.Reader, v estargz.TOCEntryVerifier, name string, e *estargz.TOCEntry) (string, int, error) {
	sr, err := r.OpenFile(name)
	if err != nil {
		return "", 0, fmt.Errorf("%s: %w", name, err)
	}
	whole := sha256.New()
	chunks := 0
	for off := int64(0); off < e.Size; {
		ce, ok := r.ChunkEntryForOffset(name, off)
		if !ok {
			return "", 0, fmt.Errorf("%s: no chunk at offset %d", name, off)
		}
		if ce.ChunkOffset != off || ce.ChunkSize <= 0 {
			return "", 0, fmt.Errorf("%s: chunk at %d has offset %d size %d", name, off, ce.ChunkOffset, ce.ChunkSize)
		}
		cv, err := v.Verifier(ce)
		if err != nil {
			return "", 0, fmt.Errorf("%s: %w", name, err)
		}
		if _, err := io.Copy(io.MultiWriter(whole, cv), io.NewSectionReader(sr, off, ce.ChunkSize)); err != nil {
			return "", 0, fmt.Errorf("%s: read chunk at %d: %w", name, off, err)
		}
		if !cv.Verified() {
			return "", 0, fmt.Errorf("%s: chunk at %d does not match its digest", name, off)
		}
		off += ce.ChunkSize
		chunks++
	}
	sum := hex.EncodeToString(whole.Sum(nil))
	if e.Digest != "" && e.Digest != "sha256:"+sum {
		return "", 0, fmt.Errorf("%s: content sha256:%s does not match digest %s", name, sum, e.Digest)
	}
	return sum, chunks, nil
}
