package devinfo

import (
	"context"
	"slices"
	"strings"
	"testing"
)

func TestParseWipefs(t *testing.T) {
	tests := []struct {
		name    string
		out     string
		want    []Signature
		wantErr string
	}{
		{name: "empty list", out: "{\n   \"signatures\": [\n\n   ]\n}\n", want: nil},
		{name: "no output", out: "", wantErr: "wipefs output: empty"},
		{
			name: "one",
			out: `{"signatures": [{"device": "sig.img", "offset": "0x438", "type": "ext4",
				"uuid": "ed76c95b-8f1e-4f20-9a24-02c626dadd83", "label": "data"}]}`,
			want: []Signature{{Type: "ext4", Offset: 0x438, UUID: "ed76c95b-8f1e-4f20-9a24-02c626dadd83", Label: "data"}},
		},
		{
			name: "null label and uuid",
			out:  `{"signatures": [{"device": "sdb", "offset": "0x1fe", "type": "dos", "uuid": null, "label": null}]}`,
			want: []Signature{{Type: "dos", Offset: 0x1fe}},
		},
		{
			name: "several",
			out: `{"signatures": [
				{"device": "sdb", "offset": "0x200", "type": "gpt", "uuid": "0c9f1b2e-0000-4000-8000-000000000001", "label": null},
				{"device": "sdb", "offset": "0x1ffffe00", "type": "gpt", "uuid": "0c9f1b2e-0000-4000-8000-000000000001", "label": null},
				{"device": "sdb", "offset": "0x1fe", "type": "PMBR", "uuid": null, "label": null}
			]}`,
			want: []Signature{
				{Type: "gpt", Offset: 0x200, UUID: "0c9f1b2e-0000-4000-8000-000000000001"},
				{Type: "gpt", Offset: 0x1ffffe00, UUID: "0c9f1b2e-0000-4000-8000-000000000001"},
				{Type: "PMBR", Offset: 0x1fe},
			},
		},
		{
			name: "decimal offset",
			out:  `{"signatures": [{"offset": "4086", "type": "swap"}]}`,
			want: []Signature{{Type: "swap", Offset: 4086}},
		},
		{name: "bad JSON", out: `{"signatures": [`, wantErr: "wipefs output"},
		{name: "not an object", out: `[1, 2]`, wantErr: "wipefs output"},
		{name: "bad offset", out: `{"signatures": [{"offset": "0xzz", "type": "ext4"}]}`, wantErr: "ext4 signature: offset"},
		{name: "no type", out: `{"signatures": [{"offset": "0x10"}]}`, wantErr: "has no type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseWipefs([]byte(tt.out))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("parseWipefs error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseWipefs: %v", err)
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("parseWipefs = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestSignatureString(t *testing.T) {
	tests := []struct {
		sig  Signature
		want string
	}{
		{Signature{Type: "ext4", Offset: 0x438, UUID: "ed76c95b", Label: "data"}, `ext4 (UUID ed76c95b, label "data") at offset 0x438`},
		{Signature{Type: "swap", Offset: 0xff6, UUID: "88f54583"}, `swap (UUID 88f54583) at offset 0xff6`},
		{Signature{Type: "vfat", Offset: 0x52, Label: "EFI"}, `vfat (label "EFI") at offset 0x52`},
		{Signature{Type: "dos", Offset: 0x1fe}, `dos at offset 0x1fe`},
		{Signature{Type: "xfs"}, `xfs at offset 0x0`},
	}
	for _, tt := range tests {
		if got := tt.sig.String(); got != tt.want {
			t.Errorf("String() = %q, want %q", got, tt.want)
		}
	}
}

func TestSignaturesWithoutWipefs(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := Signatures(context.Background(), "/dev/null")
	if err == nil || !strings.Contains(err.Error(), "wipefs (util-linux) is not installed") {
		t.Fatalf("Signatures with no wipefs on PATH: error = %v, want one saying wipefs is not installed", err)
	}
}

// FuzzParseWipefs: whatever wipefs prints, parseWipefs returns signatures
// or an error, never both, never a signature without a type, and never
// panics.
func FuzzParseWipefs(f *testing.F) {
	f.Add([]byte(`{"signatures": [{"device": "sig.img", "offset": "0x438", "type": "ext4", "uuid": null, "label": "x"}]}`))
	f.Add([]byte(`{"signatures": []}`))
	f.Add([]byte(``))
	f.Fuzz(func(t *testing.T, out []byte) {
		sigs, err := parseWipefs(out)
		if err != nil && sigs != nil {
			t.Fatalf("both signatures and an error: %v, %v", sigs, err)
		}
		for _, s := range sigs {
			if s.Type == "" {
				t.Fatalf("signature without a type: %+v", s)
			}
		}
	})
}
