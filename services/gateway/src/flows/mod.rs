//! The gateway's flows, one module each, all over the shared core
//! (`crate::shared`) and never importing one another: the image flow
//! (Store, RequestAccess, Retrieve, Verify, Locate, FetchShare), the DICOM
//! flow (StoreDicom, the C-STORE sink, FindDicomStudy, RetrieveDicom),
//! region-wise processing (Process) and delete/repair (Delete, Repair, the
//! background repairer). The gRPC edge (`crate::service`) dispatches to them.

pub(crate) mod delete;
pub(crate) mod dicom;
pub(crate) mod image;
pub(crate) mod process;
