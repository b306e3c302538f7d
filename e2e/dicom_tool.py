"""Helpers for e2e/dicom.sh (run with the .venv python: pydicom comes with
pynetdicom, the test files with pydicom / pydicom-data).

  make-study DIR              write a 5-instance study (4 x CT_small with new
                              SOP UIDs, 1 x JPEG 2000) sharing one patient
                              and Study Instance UID; prints the study UID
  store-json FILE OWNER       the StoreDicom request stream as grpcurl JSON
  check-retrieve OUT SRC_DIR MODE [COUNT]
                              OUT: grpcurl's RetrieveDicom output. MODE
                              "identical": every instance's data set equals
                              one sent file's data set (the SCP writes its own
                              file meta), SHA-256 as announced; "deidentified":
                              no patient identity, (0012,0062) = YES, one
                              study UID, all de-identified
"""
import base64
import hashlib
import io
import json
import os
import sys

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

PATIENT_NAME = "Tesserae^Eusebia^E2E"
PATIENT_ID = "E2E-MRN-90417"
STUDY_UID = "1.2.826.0.1.3680043.10.1137.4242.1"


def make_study(out):
    os.makedirs(out, exist_ok=True)
    series = generate_uid()
    ct = get_testdata_file("CT_small.dcm")
    j2k = get_testdata_file("JPEG2000.dcm")
    for i, src in enumerate([ct, ct, ct, ct, j2k]):
        ds = pydicom.dcmread(src)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.StudyInstanceUID = STUDY_UID
        ds.SeriesInstanceUID = series
        uid = f"{STUDY_UID}.{i + 1}"
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        ds.save_as(os.path.join(out, f"im{i + 1}.dcm"), enforce_file_format=True)
    print(STUDY_UID)


def dataset_bytes(data):
    """The bytes after the file meta group (preamble + DICM + group 2)."""
    assert data[128:132] == b"DICM", "not a Part 10 file"
    # (0002,0000) UL group length: explicit VR LE, value at offset 140.
    assert data[132:136] == b"\x02\x00\x00\x00", "no meta group length first"
    length = int.from_bytes(data[140:144], "little")
    return data[144 + length:]


def read_messages(path):
    text = open(path).read()
    dec = json.JSONDecoder()
    i, out = 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = dec.raw_decode(text, i)
        out.append(obj)


def instances(path):
    cur, res = None, []
    for m in read_messages(path):
        if "instance" in m:
            if cur:
                res.append(cur)
            cur = [m["instance"], b""]
        elif "chunk" in m:
            cur[1] += base64.b64decode(m["chunk"])
        else:
            raise SystemExit(f"unexpected message {m}")
    if cur:
        res.append(cur)
    for h, data in res:
        if int(h.get("size", 0)) != len(data):
            raise SystemExit(f"instance {h['instanceId']}: size differs")
        if base64.b64decode(h["sha256"]) != hashlib.sha256(data).digest():
            raise SystemExit(f"instance {h['instanceId']}: SHA-256 differs")
    return res


def check_retrieve(out, src_dir, mode, count=None):
    got = instances(out)
    sent = {dataset_bytes(open(os.path.join(src_dir, f), "rb").read())
            for f in os.listdir(src_dir) if f.endswith(".dcm")}
    want = int(count) if count else len(sent)
    if len(got) != want:
        raise SystemExit(f"{len(got)} instances retrieved, {want} expected")
    study_uids = set()
    for h, data in got:
        if mode == "identical":
            if h.get("deidentified"):
                raise SystemExit("a de-identified file for a clinician")
            if dataset_bytes(data) not in sent:
                raise SystemExit(f"instance {h['instanceId']}: data set differs from every sent file")
            names = {a["value"] for a in h.get("patientAttributes", [])}
            if PATIENT_NAME not in names:
                raise SystemExit("identity missing for a clinician")
        elif mode == "deidentified":
            if not h.get("deidentified") or h.get("patientAttributes"):
                raise SystemExit("identity shown to a researcher")
            for secret in (PATIENT_NAME, "Tesserae", PATIENT_ID, STUDY_UID):
                if secret.encode() in data:
                    raise SystemExit(f"{secret!r} in a de-identified file")
            ds = pydicom.dcmread(io.BytesIO(data))
            if ds.PatientIdentityRemoved != "YES":
                raise SystemExit("(0012,0062) is not YES")
            study_uids.add(ds.StudyInstanceUID)
        else:
            raise SystemExit(f"unknown mode {mode}")
    if mode == "deidentified" and len(study_uids) != 1:
        raise SystemExit(f"{len(study_uids)} study UIDs after de-identification, expected 1")
    print(f"{len(got)} instances ok ({mode})")


def store_json(path, owner):
    data = open(path, "rb").read()
    print(json.dumps({"header": {"owner": owner, "size": str(len(data))}}))
    for i in range(0, len(data), 1 << 20):
        print(json.dumps({"chunk": base64.b64encode(data[i:i + (1 << 20)]).decode()}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"make-study": make_study, "check-retrieve": check_retrieve,
     "store-json": store_json}[cmd](*args)
