/* x86_64 guest entry and exception stubs. The host enters cvm_start in 64-bit mode with
 * RDI = &struct cvm_boot_info and RSP = top of this vCPU's stack, interrupts disabled. */
  .section .text.cvm_start, "ax"
  .global cvm_start
cvm_start:
  andq $-16, %rsp
  pushq %rdi
  call cvm_x86_install_idt
  popq %rdi
  call cvm_guest_main
1:
  hlt
  jmp 1b

/* Exception stubs: push a dummy error code where the CPU does not, then the vector. */
.macro STUB vec, has_err
  .global cvm_x86_stub_\vec
cvm_x86_stub_\vec:
  .if \has_err == 0
  pushq $0
  .endif
  pushq $\vec
  jmp cvm_x86_stub_common
.endm

  .text
  STUB 0,0
  STUB 1,0
  STUB 2,0
  STUB 3,0
  STUB 4,0
  STUB 5,0
  STUB 6,0
  STUB 7,0
  STUB 8,1
  STUB 9,0
  STUB 10,1
  STUB 11,1
  STUB 12,1
  STUB 13,1
  STUB 14,1
  STUB 15,0
  STUB 16,0
  STUB 17,1
  STUB 18,0
  STUB 19,0
  STUB 20,0
  STUB 21,1
  STUB 22,0
  STUB 23,0
  STUB 24,0
  STUB 25,0
  STUB 26,0
  STUB 27,0
  STUB 28,0
  STUB 29,1
  STUB 30,1
  STUB 31,0

cvm_x86_stub_common:
  /* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS */
  movq 0(%rsp), %rdi
  movq 8(%rsp), %rsi
  movq 16(%rsp), %rdx
  movq %cr2, %rcx
  andq $-16, %rsp
  call cvm_x86_exception
2:
  hlt
  jmp 2b

  .section .rodata
  .global cvm_x86_stub_table
  .balign 8
cvm_x86_stub_table:
  .irp v,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
  .quad cvm_x86_stub_\v
  .endr

  .section .note.GNU-stack, "", %progbits
